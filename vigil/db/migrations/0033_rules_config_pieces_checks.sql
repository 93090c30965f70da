-- The references between the rules config tables of 0032 go: a foreign key check locks the row
-- it finds (FOR KEY SHARE), which needs UPDATE on it, and these tables are append-only, with
-- UPDATE revoked even from their owner. Their writer (services/rules/adapters/config_store.py)
-- stores the pieces and the parent before the rows that name them, in one transaction, and a
-- replay checks every piece and each version's content hash when it loads one.
ALTER TABLE rules_config_manifests DROP CONSTRAINT rules_config_manifests_parent_hash_fkey;
ALTER TABLE rules_config_manifest_changes
    DROP CONSTRAINT rules_config_manifest_changes_content_hash_fkey;
ALTER TABLE rules_config_manifest_changes
    DROP CONSTRAINT rules_config_manifest_changes_piece_hash_fkey;
