-- Enrolment through the care-team API and `vigil admin`: a patient's date of birth or, when the
-- care team records only an age, the age in years as given at enrolment; and the care team a
-- device was registered for, so that an unbound device is visible to that team alone. Devices
-- registered before this column existed have none and are seen through their bindings.
ALTER TABLE patients
    ADD COLUMN birth_date date,
    ADD COLUMN age_years integer CHECK (age_years IS NULL OR (age_years >= 0 AND age_years <= 130));

ALTER TABLE devices
    ADD COLUMN care_team_id text REFERENCES care_teams (care_team_id);
