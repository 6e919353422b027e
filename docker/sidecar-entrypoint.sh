#!/bin/sh
# The sidecar container. With DEV_MODE=1 (the try-out in compose.yaml): a dev
# store made on first start (one share, auto-unseal; NOT FOR PRODUCTION) and
# the master key DEV_KEY created if missing. Otherwise `tde serve`, sealed
# until its custodians unseal it (docs/CONTAINERS.md).
set -eu
if [ "${DEV_MODE:-}" != "1" ]; then
  exec tde serve "$@"
fi
tde serve --dev "$@" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
i=0
until tde status >/dev/null 2>&1; do
  i=$((i + 1))
  [ "$i" -lt 300 ] || { echo "the dev sidecar did not come up" >&2; exit 1; }
  kill -0 "$pid" 2>/dev/null || { wait "$pid"; exit $?; }
  sleep 0.2
done
key=${DEV_KEY:-pg-main}
tde key show "$key" >/dev/null 2>&1 || tde key create "$key"
# Until the daemon stops (a signal interrupts the first wait).
wait "$pid" || true
wait "$pid" 2>/dev/null || true
