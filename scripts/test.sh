#!/usr/bin/env bash
# The one test command (README "Tests"): formatting, lints, then every test of the workspace.
# Needs only a Rust toolchain: fixtures are committed, no Python, torch or network at test time.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# the official WaveSpeed Python SDK against a live `skyreels serve` (creates its own venv)
./scripts/test_sdk.sh
