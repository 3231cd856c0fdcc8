-- Every change to what the per-request account check reads (auth/postgres.py: tier, disabled,
-- admin, session version, revoked token families) notifies channel `adiuva_accounts` with the
-- user's id, at commit, whichever node or tool wrote it (the API, the CLI, billing webhooks).
-- Each node keeps the accounts it checked in memory and forgets one when its notice arrives.
CREATE FUNCTION adiuva_account_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'users' THEN
        PERFORM pg_notify('adiuva_accounts', CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END);
    ELSE
        PERFORM pg_notify('adiuva_accounts', CASE WHEN TG_OP = 'DELETE' THEN OLD.user_id ELSE NEW.user_id END);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER users_changed AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION adiuva_account_changed();
CREATE TRIGGER revoked_families_changed AFTER INSERT OR UPDATE OR DELETE ON revoked_families
    FOR EACH ROW EXECUTE FUNCTION adiuva_account_changed();
