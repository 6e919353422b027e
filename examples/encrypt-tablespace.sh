#!/usr/bin/env bash
# Puts tables of a running PostgreSQL cluster into an encrypted tablespace:
# mounts a tde tablespace (a new data key under a master key, or the existing
# key file), creates the tablespace on it, and moves the tables and their
# indexes in with ALTER TABLE / ALTER INDEX ... SET TABLESPACE. Re-running it
# is safe: what is already done is left as it is.
#
#   examples/encrypt-tablespace.sh --key pg-main --tablespace secure \
#       --cluster prod-1 --backing /srv/tde/secure --mountpoint /mnt/tde/secure \
#       --psql "runuser -u postgres -- psql -h /run/postgresql -d sales" \
#       --table public.card --table public.customer
#
#   ... --all-from pg_default      every table, index and materialized view
#                                  of the database's own schemas in that
#                                  tablespace
#
# Run as root (the mount), with the sidecar unsealed. ALTER TABLE ... SET
# TABLESPACE takes an ACCESS EXCLUSIVE lock and copies the table: plan it
# like any table rewrite. The old plaintext copies stay in the WAL, in old
# base backups and in the old disk's free space: see docs/POSTGRES.md.
# In production, mount with the tde-mount@ unit (packaging/systemd) so the
# mount comes back at boot before PostgreSQL; this script mounts with
# `tde mount --daemon` when nothing is mounted there yet.
set -euo pipefail

usage() {
  sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}
die() { echo "encrypt-tablespace: $*" >&2; exit 1; }
step() { echo "==> $*"; }

TDE=${TDE:-tde}
key="" name="" cluster="default" backing="" mnt="" all_from="" os_user="postgres"
psql_cmd="psql"
tables=()
while [ $# -gt 0 ]; do
  case "$1" in
    --key) key=$2; shift 2 ;;
    --tablespace) name=$2; shift 2 ;;
    --cluster) cluster=$2; shift 2 ;;
    --backing) backing=$2; shift 2 ;;
    --mountpoint) mnt=$2; shift 2 ;;
    --psql) psql_cmd=$2; shift 2 ;;
    --table) tables+=("$2"); shift 2 ;;
    --all-from) all_from=$2; shift 2 ;;
    --os-user) os_user=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
if [ -z "$name" ] || [ -z "$backing" ] || [ -z "$mnt" ]; then usage; fi
[ ${#tables[@]} -gt 0 ] || [ -n "$all_from" ] || die "name --table TABLE (repeatable) or --all-from TABLESPACE"
[[ "$mnt" = /* ]] || die "--mountpoint must be an absolute path (it becomes the tablespace's LOCATION)"
read -r -a psql <<<"$psql_cmd"
psql+=(-X -q -A -t -v ON_ERROR_STOP=1)

step "checking the sidecar"
set +e
"$TDE" status >/dev/null
rc=$?
set -e
case $rc in
  0) ;;
  2) die "the sidecar is sealed (or not initialized): unseal it first (tde unseal)" ;;
  *) die "cannot reach the sidecar: is tde serve running, and is TDE_CONFIG set?" ;;
esac

step "checking PostgreSQL"
"${psql[@]}" -c "SELECT 1" >/dev/null || die "psql cannot connect: check --psql"

mounted() { grep -q " $(realpath "$mnt") fuse" /proc/self/mounts; }
if [ -d "$mnt" ] && mounted; then
  step "$mnt is already mounted"
else
  step "mounting $backing on $mnt"
  install -d -o "$os_user" -g "$os_user" -m 0700 "$backing" "$mnt"
  if [ -e "$backing/tde.key" ]; then
    "$TDE" mount --tablespace "$name" --cluster "$cluster" --daemon "$backing" "$mnt"
  else
    [ -n "$key" ] || die "--key is needed for a new tablespace (no key file in $backing)"
    "$TDE" mount --init --key "$key" --tablespace "$name" --cluster "$cluster" --daemon "$backing" "$mnt"
  fi
fi

step "creating tablespace $name at $mnt"
"${psql[@]}" -v ts="$name" -v loc="$mnt" <<'SQL'
SELECT format('CREATE TABLESPACE %I LOCATION %L', :'ts', :'loc')
 WHERE NOT EXISTS (SELECT FROM pg_tablespace WHERE spcname = :'ts') \gexec
SQL

if [ -n "$all_from" ]; then
  step "moving everything in $all_from to $name"
  "${psql[@]}" -v ts="$name" -v src="$all_from" <<'SQL'
-- Tables, materialized views, then indexes of the user's schemas (not the
-- catalogs or information_schema); a relation in the database's default
-- tablespace has reltablespace 0. TOAST tables move with their table.
SELECT format('ALTER %s %s SET TABLESPACE %I',
              CASE c.relkind WHEN 'r' THEN 'TABLE' WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'INDEX' END,
              c.oid::regclass, :'ts')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'm', 'i')
   AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname NOT LIKE 'pg\_toast%' AND n.nspname NOT LIKE 'pg\_temp%'
   AND c.reltablespace IN (
         SELECT oid FROM pg_tablespace WHERE spcname = :'src'
         UNION ALL
         SELECT 0 FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace
          WHERE d.datname = current_database() AND t.spcname = :'src')
 ORDER BY c.relkind = 'i', c.oid \gexec
SQL
fi
for t in "${tables[@]}"; do
  step "moving $t and its indexes to $name"
  # The name goes through regclass: it must name an existing table, and
  # comes back quoted.
  "${psql[@]}" -v ts="$name" -v tbl="$t" <<'SQL'
SELECT format('ALTER TABLE %s SET TABLESPACE %I', :'tbl'::regclass, :'ts') \gexec
SELECT format('ALTER INDEX %s SET TABLESPACE %I', indexrelid::regclass, :'ts')
  FROM pg_index WHERE indrelid = :'tbl'::regclass \gexec
SQL
done

step "now in $name"
"${psql[@]}" -v ts="$name" <<'SQL'
SELECT c.oid::regclass || ' (' || CASE c.relkind WHEN 'i' THEN 'index' WHEN 'm' THEN 'materialized view' ELSE 'table' END || ')'
  FROM pg_class c JOIN pg_tablespace t ON c.reltablespace = t.oid
 WHERE t.spcname = :'ts' ORDER BY 1;
SQL
echo "done. The plaintext copies left behind (WAL, backups, free space): see docs/POSTGRES.md."
