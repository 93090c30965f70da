-- End of infusion and discharge (services/api/service_layer/discharge.py): when the patient's
-- bag course ended (the pumps were unbound then; infusion rules stop paging from that time,
-- fever monitoring goes on) and when the patient was discharged, why and by whom (every binding
-- ended then; no rule pages for them from that time). The record, readings and alerts stay.
ALTER TABLE patients
    ADD COLUMN infusion_ended_at timestamptz,
    ADD COLUMN discharged_at timestamptz,
    ADD COLUMN discharge_reason text
        CHECK (discharge_reason IS NULL OR length(discharge_reason) BETWEEN 1 AND 500),
    ADD COLUMN discharged_by text,
    ADD CONSTRAINT patients_discharge_complete
        CHECK ((discharged_at IS NULL) = (discharge_reason IS NULL)
               AND (discharged_at IS NULL) = (discharged_by IS NULL)),
    -- A discharge ends the infusion too, at the latest at the discharge.
    ADD CONSTRAINT patients_discharge_after_infusion
        CHECK (discharged_at IS NULL
               OR (infusion_ended_at IS NOT NULL AND infusion_ended_at <= discharged_at));

-- The roster reads the patients still monitored.
CREATE INDEX patients_discharged ON patients (care_team_id) WHERE discharged_at IS NOT NULL;
