#!/usr/bin/env bash
# WaveSpeed's own MCP server (wavespeed-mcp, what AI assistants use to call WaveSpeed) against a live
# `skyreels serve` on the bundled tiny weights: its generate_video tool, called over the MCP stdio
# protocol with WAVESPEED_API_HOST pointing at the server, must get the size, duration and
# flow_shift it asks for. Creates its own venv (mcp-venv in target/ or $CARGO_TARGET_DIR, from PyPI:
# wavespeed-mcp with the versions it imports with, and PyAV), runs tests/mcp/mcp_client.py, then
# stops the server with SIGTERM. Needs python3 (3.11 or later) and PyPI the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/tiny_server.sh
venv="$target/mcp-venv"
# wavespeed-mcp 0.1.27 asks for mcp[cli]>=1.6.0 and pydantic>=2.6.1, unpinned: mcp 1.12 is the one
# of its time, with the pydantic (< 2.12) and pydantic-settings (newer ones warn on FastMCP's
# settings at import) it was released against
python_venv "$venv" "wavespeed_mcp.utils, mcp.client.stdio, av" "wavespeed-mcp==0.1.27" "mcp[cli]==1.12.4" \
    "pydantic==2.11.10" "pydantic-settings==2.10.1" "av>=12"
key="mcp-test-$RANDOM$RANDOM"
start_tiny_server "$key"
if ! "$venv/bin/python" tests/mcp/mcp_client.py "$url" "$key" weights/example.png; then
    cat "$tmp/log"
    exit 1
fi
stop_tiny_server
echo "MCP test passed"
