-- How a device reports, part of its registration: a thermometer is 'continuous' (a patch or a
-- monitor reporting every few minutes) or 'spot_check' (a caregiver takes a reading a few
-- times a day, and about hourly during a fever). The rules use it for what "silent" means for
-- that device (docs/rules.md). Pumps report continuously.
ALTER TABLE devices
    ADD COLUMN reporting text NOT NULL DEFAULT 'continuous'
        CHECK (reporting IN ('continuous', 'spot_check'));
