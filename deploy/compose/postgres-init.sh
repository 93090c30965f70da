#!/bin/sh
# Run once by the TimescaleDB image when it creates the cluster (/docker-entrypoint-initdb.d/,
# after the image's own script has created the timescaledb extension in the vigil database).
#
# Two roles: vigil_owner owns the database and, through `vigil migrate`, every table; vigil_app is
# what the services log in as, with no rights of its own until `vigil migrate --grant-to
# vigil_app` grants it rows only (vigil/db/privileges.py). Neither is a superuser.
set -eu
: "${VIGIL_PG_OWNER_PASSWORD:?}" "${VIGIL_PG_APP_PASSWORD:?}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v owner_password="$VIGIL_PG_OWNER_PASSWORD" -v app_password="$VIGIL_PG_APP_PASSWORD" <<'SQL'
CREATE ROLE vigil_owner WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'owner_password';
CREATE ROLE vigil_app WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'app_password';
ALTER DATABASE vigil OWNER TO vigil_owner;
REVOKE ALL ON DATABASE vigil FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE vigil TO vigil_owner;
GRANT CONNECT ON DATABASE vigil TO vigil_app;
SQL
