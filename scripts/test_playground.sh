#!/usr/bin/env bash
# The playground page in a real browser: Debian's chromium and chromium-driver (installed from
# Debian's packages when missing; never a browser download) driven by Selenium (PyPI, in its own
# venv: browser-venv in target/ or $CARGO_TARGET_DIR) against a live `skyreels serve` on the
# bundled tiny weights with an API key. The screenshot of the finished state goes to
# target/playground/playground.png.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends chromium chromium-driver
fi
venv="$target/browser-venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import selenium" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "selenium==4.51.0"
fi
cargo build -q --locked -p skyreels-cli --bin skyreels
tmp=$(mktemp -d)
key="browser-test-$RANDOM$RANDOM"
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
grep -q "playground at $url/playground" "$tmp/log" || { cat "$tmp/log"; echo "no playground URL in the log"; exit 1; }
if ! "$venv/bin/python" tests/browser/playground_test.py "$url" "$key" weights/example.png "$target/playground"; then
    cat "$tmp/log"
    exit 1
fi
kill -TERM "$pid"
wait "$pid" || { cat "$tmp/log"; echo "server did not exit cleanly on SIGTERM"; exit 1; }
echo "playground test passed"
