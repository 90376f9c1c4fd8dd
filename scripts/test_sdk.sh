#!/usr/bin/env bash
# The official WaveSpeed Python SDK against a live `skyreels serve` on the bundled tiny weights.
# Creates its own venv (sdk-venv in target/ or $CARGO_TARGET_DIR: wavespeed + PyAV from PyPI),
# starts the server on a free port with an API key, runs tests/sdk/sdk_client.py, then stops the
# server with SIGTERM and checks it exits cleanly. Needs python3 and PyPI the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
venv="$target/sdk-venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import wavespeed, av" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "wavespeed==2.0.5" "av>=12"
fi
cargo build -q --locked -p skyreels-cli --bin skyreels
tmp=$(mktemp -d)
key="sdk-test-$RANDOM$RANDOM"
"$target/debug/skyreels" serve --port 0 --api-key "$key" --output-dir "$tmp/out" > "$tmp/log" 2>&1 &
pid=$!
cleanup() { kill "$pid" 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
url=""
for _ in $(seq 1 600); do
    url=$(grep -o 'listening on http://[0-9.:]*' "$tmp/log" | head -1 | cut -d' ' -f3 || true)
    [ -n "$url" ] && break
    kill -0 "$pid" 2>/dev/null || { cat "$tmp/log"; exit 1; }
    sleep 0.1
done
[ -n "$url" ] || { cat "$tmp/log"; echo "server did not start"; exit 1; }
if ! "$venv/bin/python" tests/sdk/sdk_client.py "$url" "$key" weights/example.png; then
    cat "$tmp/log"
    exit 1
fi
kill -TERM "$pid"
if ! wait "$pid"; then
    cat "$tmp/log"
    echo "server did not exit cleanly on SIGTERM"
    exit 1
fi
grep -q "shutting down" "$tmp/log"
# a log file gets plain text: no colour codes, no raw encoder chatter
if grep -q $'\x1b\[' "$tmp/log"; then echo "colour codes in the server's log file"; exit 1; fi
if grep -q "OpenH264" "$tmp/log"; then echo "raw encoder output in the server's log"; exit 1; fi
echo "SDK test passed"
