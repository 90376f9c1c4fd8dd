#!/usr/bin/env bash
# The GPU checks of the CUDA build, in two halves:
#
#   ./scripts/gpu_check.sh pack      # here (no GPU needed): build the release CUDA binary and the GPU
#                                    # parity tests, gzipped into target/gpu-pack (~50 MB)
#   ./scripts/gpu_check.sh run OUT   # on the GPU machine, from the repository root with target/gpu-pack:
#                                    # nvidia-smi, the library check, the GPU tests, then `skyreels
#                                    # bench`; every result is also written to OUT (env.txt,
#                                    # libraries.txt, test-*.txt, bench.txt, status.txt)
#
# `run` needs only the NVIDIA driver and the CUDA 13 libraries (libcudart, libcublas, libcublasLt,
# libcurand): it finds them on the system or in any Python environment's NVIDIA wheels (PyTorch's),
# and stops before running anything if one is still missing. Bench flags go after OUT (e.g.
# `run "$OUT" --parts transformer --runs 1`). Each test binary may take SKYREELS_TEST_TIMEOUT
# seconds (180), the bench SKYREELS_BENCH_TIMEOUT (300).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PACK=target/gpu-pack

# Folders that may hold the CUDA libraries: the system's, the CUDA toolkit's, the driver's, and
# every Python environment's NVIDIA wheels (`site-packages/nvidia/*/lib`, e.g. PyTorch's CUDA 13
# libraries in nvidia/cu13/lib), so the binary runs where only PyTorch brought CUDA.
cuda_library_dirs() {
    local d py
    for d in ${LD_LIBRARY_PATH:+${LD_LIBRARY_PATH//:/ }} /usr/local/cuda/lib64 /usr/local/cuda-*/lib64 \
        /usr/local/cuda*/targets/*/lib /usr/local/nvidia/lib64 /usr/local/nvidia/lib \
        /usr/lib/x86_64-linux-gnu /usr/lib64; do
        [ -d "$d" ] && echo "$d"
    done
    for py in python3 /opt/*/.venv/bin/python3 /opt/*/bin/python3; do
        command -v "$py" >/dev/null 2>&1 &&
            "$py" -m scripts.checks.gpu_check site-packages 2>/dev/null
    done | sort -u | while read -r site; do
        for d in "$site"/nvidia/*/lib "$site"/nvidia/*/lib64 "$site"/torch/lib; do
            [ -d "$d" ] && echo "$d"
        done
    done
    for d in /opt/*/.venv/lib/python3*/site-packages/nvidia/*/lib /usr/local/lib/python3*/dist-packages/nvidia/*/lib \
        "$HOME"/.local/lib/python3*/site-packages/nvidia/*/lib; do
        [ -d "$d" ] && echo "$d"
    done
}

# Finds every library the unpacked binaries in $1 need (ldd's "not found", transitively) in the
# folders above, writes the LD_LIBRARY_PATH that resolves them to $1/.ld_library_path, and fails
# with the names still missing, before anything runs.
find_cuda_libraries() {
    local dir="$1" path="${LD_LIBRARY_PATH:-}" missing lib found d round
    local -a dirs
    mapfile -t dirs < <(cuda_library_dirs | awk '!seen[$0]++')
    for round in 1 2 3 4 5 6; do
        missing=$(for b in "$dir"/*; do LD_LIBRARY_PATH="$path" ldd "$b"; done 2>/dev/null |
            awk '/=> not found/ { print $1 }' | sort -u)
        [ -z "$missing" ] && break
        found=0
        for lib in $missing; do
            for d in "${dirs[@]}"; do
                if [ -e "$d/$lib" ]; then
                    case ":$path:" in *":$d:"*) ;; *) path="$d${path:+:$path}"; found=1 ;; esac
                    echo "found $lib in $d"
                    break
                fi
            done
        done
        [ "$found" = 1 ] || break
    done
    for b in "$dir"/skyreels "$dir"/test-*; do
        [ -e "$b" ] || continue
        echo "== ldd ${b##*/}"
        LD_LIBRARY_PATH="$path" ldd "$b" | grep -E 'cuda|cublas|curand|nvrtc|cudnn|not found' || true
    done
    if [ -n "$missing" ]; then
        echo "gpu_check: missing libraries: $(echo $missing)" >&2
        echo "gpu_check: looked in LD_LIBRARY_PATH, the system and CUDA folders, and these:" >&2
        printf '    %s\n' "${dirs[@]}" >&2
        echo "gpu_check: install the CUDA 13 libraries (e.g. pip install nvidia-cuda-runtime nvidia-cublas nvidia-curand)" >&2
        echo "gpu_check: or set LD_LIBRARY_PATH to their folder, then run again" >&2
        return 1
    fi
    echo "LD_LIBRARY_PATH=$path"
    echo "$path" > "$dir/.ld_library_path"
}

case "${1:-}" in
pack)
    ./scripts/setup_cuda.sh   # idempotent; quick when the toolkit is already there
    # shellcheck disable=SC1091
    . target/cuda/env.sh
    export CARGO_TARGET_DIR=target/cuda-build
    cargo build --release --locked --features cuda -p skyreels-cli
    tests=$(cargo test --release --locked --features cuda -p skyreels-tests --no-run --message-format=json |
        python3 -m scripts.checks.gpu_check test-binaries)
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
    out="${1:-}"
    case "$out" in
    "" | -*) echo "usage: $0 run OUT_DIR [skyreels bench flags]: results go to OUT_DIR" >&2; exit 2 ;;
    esac
    shift
    [ -d "$PACK" ] || { echo "no $PACK: run \`$0 pack\` first (and carry $PACK)" >&2; exit 1; }
    mkdir -p "$out"
    out="$(cd "$out" && pwd)"
    dir=$(mktemp -d)
    for f in "$PACK"/*.gz; do gunzip -c "$f" > "$dir/$(basename "$f" .gz)"; chmod +x "$dir/$(basename "$f" .gz)"; done
    {
        date -u
        uname -a
        nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv || echo "nvidia-smi failed"
    } 2>&1 | tee "$out/env.txt"
    # (pipefail: a pipeline fails when its first command does)
    if ! find_cuda_libraries "$dir" 2>&1 | tee "$out/libraries.txt"; then
        echo "gpu_check: status 3 (libraries missing); results in $out" | tee "$out/status.txt"
        exit 3
    fi
    LD_LIBRARY_PATH="$(cat "$dir/.ld_library_path")"
    export LD_LIBRARY_PATH
    status=0
    for t in "$dir"/test-*; do
        [ -e "$t" ] || continue
        name="${t##*/test-}"
        echo "== $name: CUDA tests" | tee "$out/test-$name.txt"
        if ! SKYREELS_REPO="$PWD" timeout "${SKYREELS_TEST_TIMEOUT:-180}" "$t" --test-threads 1 cuda 2>&1 |
            tee -a "$out/test-$name.txt"; then
            status=1
        fi
    done
    echo "== skyreels bench $*" | tee "$out/bench.txt"
    if ! timeout "${SKYREELS_BENCH_TIMEOUT:-300}" "$dir/skyreels" bench "$@" 2>&1 | tee -a "$out/bench.txt"; then
        status=1
    fi
    echo "gpu_check: status $status; results in $out" | tee "$out/status.txt"
    exit $status
    ;;
*)
    echo "usage: $0 pack | run OUT_DIR [skyreels bench flags]" >&2
    exit 2
    ;;
esac
