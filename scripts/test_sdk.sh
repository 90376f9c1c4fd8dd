#!/usr/bin/env bash
# The official WaveSpeed Python SDK against a live `skyreels serve` on the bundled tiny weights.
# Creates its own venv (sdk-venv in target/ or $CARGO_TARGET_DIR: wavespeed + PyAV from PyPI),
# starts the server on a free port with an API key and two CPU workers (--device cpu:0,cpu:1: one
# queue, a model copy each), runs tests/sdk/sdk_client.py, then stops the server with SIGTERM and
# checks it exits cleanly. Its --lora-dir holds style.safetensors (the LoRA fixture made for the tiny
# weights, tests/fixtures/lora/files/diffusers.safetensors), the LoRA name the client sends, and
# broken.safetensors (not a LoRA: its task must fail naming it, and the worker go on).
# Needs python3 and PyPI the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/tiny_server.sh
venv="$target/sdk-venv"
python_venv "$venv" "wavespeed, av" "wavespeed==2.0.5" "av>=12"
key="sdk-test-$RANDOM$RANDOM"
loras="$target/sdk-loras"
mkdir -p "$loras"
cp tests/fixtures/lora/files/diffusers.safetensors "$loras/style.safetensors"
printf 'not a LoRA' > "$loras/broken.safetensors"
start_tiny_server "$key" --device cpu:0,cpu:1 --lora-dir "$loras"
if ! "$venv/bin/python" tests/sdk/sdk_client.py "$url" "$key" weights/example.png; then
    cat "$tmp/log"
    exit 1
fi
stop_tiny_server
grep -q "shutting down" "$tmp/log"
for d in cpu:0 cpu:1; do grep -q "loading the model device=$d" "$tmp/log"; done
# a log file gets plain text: no colour codes, no raw encoder chatter
if grep -q $'\x1b\[' "$tmp/log"; then echo "colour codes in the server's log file"; exit 1; fi
if grep -q "OpenH264" "$tmp/log"; then echo "raw encoder output in the server's log"; exit 1; fi
echo "SDK test passed"
