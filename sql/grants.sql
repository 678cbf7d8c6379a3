-- Grants a loading role what the load ledger needs, run by the ledger's owner (or a
-- superuser) once the ledger exists (the owner's first `loader import` creates it):
--
--     psql -v role=etl -f sql/grants.sql                  # ledger in the schema "loader"
--     psql -v role=etl -v schema=ledger -f sql/grants.sql # ... or the one --ledger-schema names
--
-- USAGE on the schema; SELECT, INSERT, UPDATE on its tables loads, batches, rejects, leases
-- and claims, and DELETE on leases (`loader status` alone needs only USAGE and SELECT on
-- loads, batches and leases). The role also
-- needs INSERT on the target tables, which this script does not grant. Names are taken as
-- they are (psql quotes them as identifiers); running it again changes nothing. Needs psql 10+.

\set ON_ERROR_STOP on

\if :{?role}
\else
    DO $$ BEGIN RAISE EXCEPTION 'no role given: psql -v role=ROLE [-v schema=SCHEMA] -f sql/grants.sql'; END $$;
\endif

\if :{?schema}
\else
    \set schema loader
\endif

BEGIN;
GRANT USAGE ON SCHEMA :"schema" TO :"role";
GRANT SELECT, INSERT, UPDATE ON :"schema".loads, :"schema".batches, :"schema".rejects, :"schema".leases,
    :"schema".claims TO :"role";
GRANT DELETE ON :"schema".leases TO :"role";
COMMIT;
