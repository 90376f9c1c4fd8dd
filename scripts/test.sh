#!/usr/bin/env bash
# The one test command (README, and docs/testing.md): formatting, lints, then every test of the workspace.
# Fixtures are committed (no torch); the client tests make their own Python venvs from PyPI and the
# browser test installs Debian's chromium (the cluster test Debian's redis-server) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# the server crate's modules form no import cycle, and its two backends stay apart
python3 -m scripts.checks.module_graph
# the Redis-mode server tests start their own redis-server (Debian's, installed when missing)
./scripts/ensure_redis.sh
cargo test --workspace --locked
# gpu_check.sh run: finding the CUDA libraries of a GPU machine (no GPU needed)
./scripts/test_gpu_check.sh
# the official WaveSpeed Python SDK against a live `skyreels serve` (creates its own venv)
./scripts/test_sdk.sh
# WaveSpeed's MCP server (wavespeed-mcp) asking for size, duration and flow_shift (its own venv)
./scripts/test_mcp.sh
# the playground page in Debian's Chromium (installs chromium + chromium-driver when missing)
./scripts/test_playground.sh
# scale-out over Redis: 2 API nodes + 2 workers, SIGKILL, cross-node cancel/upload, restarts
# (installs Debian's redis-server when missing)
./scripts/test_cluster.sh
