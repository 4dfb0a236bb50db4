#!/usr/bin/env bash
# The original chapter's session, reproduced on loopback for every design: a traced server,
# two clients sending the original message (with its NUL, 49 bytes), then SIGTERM and the
# server's statistics. Usage: scripts/transcript.sh [DESIGN ...]
set -euo pipefail
cd "$(dirname "$0")/.."
lab=.venv/bin/lab
[ -x "$lab" ] || { echo "run 'make venv' first" >&2; exit 1; }
message="This is a test message from a stupid client lol!"
designs=("$@")
[ ${#designs[@]} -gt 0 ] || mapfile -t designs < <(.venv/bin/python -c 'from lab.sockets.designs import DESIGNS; print("\n".join(DESIGNS))')

for design in "${designs[@]}"; do
  echo "=== $design"
  log=$(mktemp)
  setsid "$lab" serve --design "$design" --host 127.0.0.1 --port 0 --trace --workers 2 >"$log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do grep -q '^ready' "$log" && break; sleep 0.1; done
  port=$(sed -n 's/^ready .* port=\([0-9]*\) .*/\1/p' "$log")
  [ -n "$port" ] || { cat "$log"; echo "server did not start" >&2; kill -- -"$pid" 2>/dev/null; exit 1; }
  for n in 1 2; do
    "$lab" client 127.0.0.1 --port "$port" --nul --message "$message" | sed "s/^/client-$n: /"
  done
  kill -TERM "$pid"; wait "$pid" || true
  sed 's/^/server: /' "$log"
  rm -f "$log"
done
