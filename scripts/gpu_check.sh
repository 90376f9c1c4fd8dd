#!/usr/bin/env bash
# The GPU checks of the CUDA build, in two halves:
#
#   ./scripts/gpu_check.sh pack      # here (no GPU needed): build the release CUDA binary and the GPU
#                                    # parity tests, gzipped into target/gpu-pack (~50 MB)
#   ./scripts/gpu_check.sh run       # on the GPU machine, from the repository root with target/gpu-pack:
#                                    # nvidia-smi, ldd, the parity tests, then `skyreels bench`
#
# `run` needs only the NVIDIA driver and the CUDA 13 libraries (libcublas, libcublasLt, libcurand,
# libnvrtc, libcudart); pass bench flags after `run` (e.g. `run --parts transformer --runs 1`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PACK=target/gpu-pack

case "${1:-}" in
pack)
    ./scripts/setup_cuda.sh   # idempotent; quick when the toolkit is already there
    # shellcheck disable=SC1091
    . target/cuda/env.sh
    export CARGO_TARGET_DIR=target/cuda-build
    cargo build --release --locked --features cuda -p skyreels-cli
    tests=$(cargo test --release --locked --features cuda -p skyreels-tests --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"] + " " + m["executable"])')
    rm -rf "$PACK" && mkdir -p "$PACK"
    strip -o "$PACK/skyreels" "$CARGO_TARGET_DIR/release/skyreels"
    # only the test binaries with GPU tests (the pack must stay under the device's 64 MiB carry)
    while read -r name exe; do
        if grep -q 'feature = "cuda"' "tests/tests/$name.rs"; then
            strip -o "$PACK/test-$name" "$exe"
        fi
    done <<<"$tests"
    gzip -9 "$PACK"/*
    ls -la "$PACK"
    ;;
run)
    shift
    [ -d "$PACK" ] || { echo "no $PACK: run \`$0 pack\` first (and carry $PACK)" >&2; exit 1; }
    dir=$(mktemp -d)
    for f in "$PACK"/*.gz; do gunzip -c "$f" > "$dir/$(basename "$f" .gz)"; chmod +x "$dir/$(basename "$f" .gz)"; done
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    ldd "$dir/skyreels" | grep -E 'cuda|cublas|curand|nvrtc'
    status=0
    for t in "$dir"/test-*; do
        echo "== ${t##*/test-}: CUDA tests"
        SKYREELS_REPO="$PWD" "$t" --test-threads 1 cuda || status=1
    done
    "$dir/skyreels" bench "$@" || status=1
    exit $status
    ;;
*)
    echo "usage: $0 pack | run [skyreels bench flags]" >&2
    exit 2
    ;;
esac
