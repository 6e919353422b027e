#!/bin/sh
# The PostgreSQL container: mounts its tablespace with `tde mount` (a new
# data key under MOUNT_KEY the first time), then runs PostgreSQL 15 with the
# tablespace MOUNT_TABLESPACE on the mount; on stop, PostgreSQL first, then the
# mount. Needs /dev/fuse and CAP_SYS_ADMIN (the mount), and the sidecar's
# /run/tde volume (its data socket).
set -eu
key=${MOUNT_KEY:-pg-main}
ts=${MOUNT_TABLESPACE:-secure}
cluster=${MOUNT_CLUSTER:-docker}
backing=/srv/tde/$ts
mnt=/var/lib/postgresql/tde/$ts
install -d -o postgres -g postgres -m 0700 "$backing" "$mnt"
install -d -o postgres -g postgres -m 0775 /var/run/postgresql
init=""
[ -e "$backing/tde.key" ] || init="--init --key $key"
# Waits for the sidecar (and its unseal) as long as MOUNT_WAIT says.
# shellcheck disable=SC2086
tde mount $init --tablespace "$ts" --cluster "$cluster" --wait "${MOUNT_WAIT:-600}" \
  --daemon --log-file /var/log/tde-mount.log "$backing" "$mnt"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  install -d -o postgres -g postgres -m 0700 "$PGDATA"
  runuser -u postgres -- initdb --auth-local=peer --auth-host=scram-sha-256 -U postgres -D "$PGDATA" >/dev/null
fi
runuser -u postgres -- postgres -D "$PGDATA" -c listen_addresses="${PG_LISTEN:-}" &
pid=$!
stop() {
  # A fast shutdown (runuser does not pass signals on to PostgreSQL).
  runuser -u postgres -- pg_ctl stop -D "$PGDATA" -m fast -w -t 50 >/dev/null || true
  wait "$pid" || true
  tde umount "$mnt" || true
  exit 0
}
trap stop TERM INT
until runuser -u postgres -- pg_isready -q; do
  kill -0 "$pid" 2>/dev/null || { echo "PostgreSQL did not start" >&2; tde umount "$mnt"; exit 1; }
  sleep 0.2
done
runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -v ts="$ts" -v loc="$mnt" <<'SQL'
SELECT format('CREATE TABLESPACE %I LOCATION %L', :'ts', :'loc')
 WHERE NOT EXISTS (SELECT FROM pg_tablespace WHERE spcname = :'ts') \gexec
SQL
touch /run/postgres-ready
wait "$pid" || true
tde umount "$mnt" || true
