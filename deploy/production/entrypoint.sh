#!/bin/sh
# Entry point of the safe haven image: read the PostgreSQL password from its secret file into
# the environment Dagster's instance config reads (DAGSTER_PG_PASSWORD), make every file the
# process writes private to its user, and run the service's command.
set -eu
if [ -n "${DAGSTER_PG_PASSWORD_FILE:-}" ]; then
    DAGSTER_PG_PASSWORD="$(cat "$DAGSTER_PG_PASSWORD_FILE")"
    export DAGSTER_PG_PASSWORD
fi
umask 077
exec "$@"
