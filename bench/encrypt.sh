#!/usr/bin/env bash
# tde encrypt / tde decrypt throughput: a dev sidecar in a temporary
# directory, SIZE_MIB of data (default 1024) encrypted from a pipe to a file,
# then decrypted to /dev/null and to a file (fsynced, named at the end).
# Prints a table. Uses target/release/tde (builds it if missing), or $TDE.
#   bench/encrypt.sh            SIZE_MIB=4096 bench/encrypt.sh
set -euo pipefail
cd "$(dirname "$0")/.."
size=${SIZE_MIB:-1024}
tde=${TDE:-target/release/tde}
[ -x "$tde" ] || cargo build --release --bin tde >&2
tde=$(realpath "$tde")
dir=$(mktemp -d)
trap 'kill "$sidecar" 2>/dev/null; wait "$sidecar" 2>/dev/null; rm -rf "$dir"' EXIT
export TDE_DATA_DIR=$dir/data TDE_CONFIG=/dev/null
"$tde" serve --dev >"$dir/serve.log" 2>&1 &
sidecar=$!
for _ in $(seq 100); do "$tde" status >/dev/null 2>&1 && break; sleep 0.1; done
"$tde" key create bench-files >/dev/null
secs() { local t0 t1; t0=$(date +%s.%N); "$@"; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
enc=$(secs sh -c "head -c ${size}M /dev/zero | '$tde' encrypt --key bench-files -o '$dir/f.tde' - >/dev/null")
dec_null=$(secs sh -c "'$tde' decrypt -o - '$dir/f.tde' >/dev/null")
dec_file=$(secs sh -c "'$tde' decrypt -o '$dir/f.out' '$dir/f.tde' >/dev/null")
row() { printf '| %-34s | %8s MiB | %7.2f s | %7.0f MiB/s |\n' "$1" "$size" "$2" "$(echo "$size / $2" | bc -l)"; }
echo "| operation | size | time | throughput |"
echo "|---|--:|--:|--:|"
row "encrypt (pipe in, file out)" "$enc"
row "decrypt (to /dev/null)" "$dec_null"
row "decrypt (to a file, fsynced)" "$dec_file"
