-- Caregivers in the loop (docs/caregivers.md): the people at home who are told, in their own
-- language, that the care team has been alerted, has seen it, could not be reached, or that
-- the alarm is over. No names and no diagnosis are stored or sent: a contact is an SMS number
-- and/or an e-mail address, a language, and the consent it was recorded with.
CREATE TABLE caregiver_contacts (
    contact_id        uuid PRIMARY KEY,
    patient_id        text NOT NULL REFERENCES patients (patient_id),
    care_team_id      text NOT NULL REFERENCES care_teams (care_team_id),
    sms               text,
    email             text,
    language          text NOT NULL CHECK (language IN ('en', 'fr', 'es')),
    -- Consent to be messaged: who recorded it (the API user) and when, and what they were told.
    consent_by        text NOT NULL,
    consent_at        timestamptz NOT NULL,
    consent_note      text,
    -- Consent withdrawn (or the contact removed): nothing is sent to it from then on.
    withdrawn_by      text,
    withdrawn_at      timestamptz,
    -- Preferred hours, in the care team's time zone, for messages that are not urgent (the
    -- acknowledgement and the all clear); both set or neither.
    preferred_from    time,
    preferred_until   time,
    created_at        timestamptz NOT NULL,
    updated_by        text NOT NULL,
    updated_at        timestamptz NOT NULL,
    CHECK (sms IS NOT NULL OR email IS NOT NULL),
    CHECK ((withdrawn_by IS NULL) = (withdrawn_at IS NULL)),
    CHECK ((preferred_from IS NULL) = (preferred_until IS NULL))
);
CREATE INDEX caregiver_contacts_patient ON caregiver_contacts (patient_id)
    WHERE withdrawn_at IS NULL;
-- An inbound SMS names its sender by number only.
CREATE INDEX caregiver_contacts_sms ON caregiver_contacts (sms) WHERE withdrawn_at IS NULL;

-- The unit's 24-hour number a family is told to call when nobody acknowledged in time.
CREATE TABLE caregiver_team_settings (
    care_team_id  text PRIMARY KEY REFERENCES care_teams (care_team_id),
    unit_phone    text NOT NULL,
    updated_by    text NOT NULL,
    updated_at    timestamptz NOT NULL
);

-- The words of each caregiver message, composed when it was decided (pages.purpose =
-- 'caregiver', pages.recipient_ref = 'caregiver:<contact_id>'), so what was sent can be shown.
CREATE TABLE caregiver_messages (
    page_id        uuid PRIMARY KEY,
    escalation_id  uuid NOT NULL REFERENCES escalations (escalation_id),
    contact_id     uuid NOT NULL REFERENCES caregiver_contacts (contact_id),
    kind           text NOT NULL CHECK (kind IN ('paged', 'acknowledged', 'exhausted',
                                                 'all_clear')),
    language       text NOT NULL,
    subject        text NOT NULL,
    body           text NOT NULL,
    created_at     timestamptz NOT NULL
);
CREATE INDEX caregiver_messages_contact ON caregiver_messages (contact_id, created_at);
CREATE INDEX caregiver_messages_escalation ON caregiver_messages (escalation_id);

-- A caregiver page is routed to the family, not to the care team.
ALTER TABLE pages DROP CONSTRAINT pages_route_check;
ALTER TABLE pages ADD CONSTRAINT pages_route_check
    CHECK (route IN ('care_team', 'fallback', 'caregiver'));
