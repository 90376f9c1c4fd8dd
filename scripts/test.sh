#!/usr/bin/env bash
# The one test command (README "Tests"): formatting, lints, then every test of the workspace.
# Fixtures are committed (no torch); the client tests make their own Python venvs from PyPI and the
# browser test installs Debian's chromium when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# gpu_check.sh run: finding the CUDA libraries of a GPU machine (no GPU needed)
./scripts/test_gpu_check.sh
# the official WaveSpeed Python SDK against a live `skyreels serve` (creates its own venv)
./scripts/test_sdk.sh
# the playground page in Debian's Chromium (installs chromium + chromium-driver when missing)
./scripts/test_playground.sh
