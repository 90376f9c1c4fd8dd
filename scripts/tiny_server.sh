# Sourced by the client tests (test_sdk.sh, test_playground.sh): a Python venv with the given
# packages, and a live `skyreels serve` on the bundled tiny weights with an API key.
#   python_venv DIR IMPORTS PACKAGE...   creates DIR unless `import IMPORTS` already works there
#   start_tiny_server KEY [ARGS...]      builds the binary, starts it on a free port (ARGS: more
#                                        `serve` flags); sets
#                                        $url, $pid, $tmp ($tmp/log is its log) and an EXIT trap
#   stop_tiny_server                     SIGTERM, and fails unless it exits cleanly
target="${CARGO_TARGET_DIR:-target}"

python_venv() {
    local dir=$1 imports=$2
    shift 2
    if [ ! -x "$dir/bin/python" ] || ! "$dir/bin/python" -c "import $imports" 2>/dev/null; then
        python3 -m venv "$dir"
        "$dir/bin/pip" install -q --disable-pip-version-check "$@"
    fi
}

start_tiny_server() {
    cargo build -q --locked -p skyreels-cli --bin skyreels
    tmp=$(mktemp -d)
    local key=$1
    shift
    "$target/debug/skyreels" serve --port 0 --api-key "$key" --output-dir "$tmp/out" "$@" > "$tmp/log" 2>&1 &
    pid=$!
    trap 'kill "$pid" 2>/dev/null || true; rm -rf "$tmp"' EXIT
    url=""
    for _ in $(seq 1 600); do
        url=$(grep -o 'listening on http://[0-9.:]*' "$tmp/log" | head -1 | cut -d' ' -f3 || true)
        [ -n "$url" ] && return 0
        kill -0 "$pid" 2>/dev/null || { cat "$tmp/log"; exit 1; }
        sleep 0.1
    done
    cat "$tmp/log"
    echo "server did not start"
    exit 1
}

stop_tiny_server() {
    kill -TERM "$pid"
    if ! wait "$pid"; then
        cat "$tmp/log"
        echo "server did not exit cleanly on SIGTERM"
        exit 1
    fi
}
