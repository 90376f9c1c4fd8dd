#!/usr/bin/env bash
# The Redis scale-out mode, live: Redis 7 (Debian's redis-server, installed when missing), two
# API nodes and two `skyreels worker` processes on the bundled tiny weights, driven by the
# official WaveSpeed Python SDK (tests/cluster/cluster_test.py: SIGKILL of a worker mid-task, a
# cancel across nodes, uploads across nodes, an API node restart, a Redis restart with AOF).
# Everything runs on loopback in a temporary folder and is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/tiny_server.sh
./scripts/ensure_redis.sh
venv="$target/sdk-venv"
python_venv "$venv" "wavespeed, av" "wavespeed==2.0.5" "av>=12"
cargo build -q --locked -p skyreels-cli --bin skyreels
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! "$venv/bin/python" -m tests.cluster.cluster_test "$target/debug/skyreels" "$(command -v redis-server)" weights/example.png "$work"; then
    for f in "$work"/*.log; do echo "== $f"; tail -40 "$f"; done
    exit 1
fi
