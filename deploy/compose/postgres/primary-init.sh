#!/usr/bin/env bash
# Runs once, when the primary's data folder is created (docker-entrypoint-initdb.d):
# a role for streaming replication, a physical slot per replica (the primary keeps
# the WAL a replica still needs) and the pg_hba line that lets the replicas in.
set -euo pipefail
: "${REPLICATION_PASSWORD:?set REPLICATION_PASSWORD}"
psql -v ON_ERROR_STOP=1 -v password="$REPLICATION_PASSWORD" \
  --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD :'password';
SELECT pg_create_physical_replication_slot('replica_1');
SQL
echo "host replication replicator all scram-sha-256" >>"$PGDATA/pg_hba.conf"
