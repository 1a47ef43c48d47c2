#!/usr/bin/env bash
# A streaming replica of the `postgres` service: on first start, a base backup of
# the primary (pg_basebackup -R writes the standby settings), then the server in
# hot standby. Later starts reuse the copy and resume streaming.
set -euo pipefail
: "${PGDATA:?}" "${PRIMARY_HOST:?}" "${REPLICATION_PASSWORD:?}"
if [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA"
  chown postgres:postgres "$PGDATA"
  chmod 700 "$PGDATA"
  exec gosu postgres "$0" "$@"
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  # The password goes into the standby's primary_conninfo with the rest.
  conninfo="host=$PRIMARY_HOST user=replicator password=$REPLICATION_PASSWORD"
  for attempt in $(seq 1 30); do
    if pg_basebackup -d "$conninfo" -D "$PGDATA" -R -X stream -c fast \
      -S "${REPLICATION_SLOT:-replica_1}"; then
      break
    fi
    echo "replica: base backup attempt $attempt failed; trying again in 2 s" >&2
    find "$PGDATA" -mindepth 1 -delete
    [ "$attempt" -lt 30 ] || exit 1
    sleep 2
  done
fi
exec postgres -c hot_standby=on "$@"
