#!/usr/bin/env bash
# The playground page in a real browser: Debian's chromium and chromium-driver (installed from
# Debian's packages when missing; never a browser download) driven by Selenium (PyPI, in its own
# venv: browser-venv in target/ or $CARGO_TARGET_DIR) against a live `skyreels serve` on the
# bundled tiny weights with an API key. The screenshot of the finished state goes to
# target/playground/playground.png. Its --lora-dir holds style.safetensors (the LoRA fixture made for the
# tiny weights), the LoRA row the test sends.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/tiny_server.sh
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends chromium chromium-driver
fi
venv="$target/browser-venv"
python_venv "$venv" selenium "selenium==4.51.0"
key="browser-test-$RANDOM$RANDOM"
loras="$target/playground-loras"
mkdir -p "$loras"
cp tests/fixtures/lora/files/diffusers.safetensors "$loras/style.safetensors"
start_tiny_server "$key" --lora-dir "$loras"
grep -q "playground at $url/playground" "$tmp/log" || { cat "$tmp/log"; echo "no playground URL in the log"; exit 1; }
if ! "$venv/bin/python" tests/browser/playground_test.py "$url" "$key" weights/example.png "$target/playground"; then
    cat "$tmp/log"
    exit 1
fi
stop_tiny_server
echo "playground test passed"
