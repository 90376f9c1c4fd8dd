#!/usr/bin/env bash
# Installs what `cargo build --release --features cuda` needs, on a machine with or without a GPU,
# from PyPI only (NVIDIA's CUDA wheels: nvcc, headers, cudart, cuBLAS, cuRAND, NVRTC, NCCL for
# `--features cuda,nccl`, and the
# CUTLASS headers flash attention compiles against), and writes an environment file that points
# candle's, cudarc's and skyreels-flash-attn's build scripts at it:
#
#     ./scripts/setup_cuda.sh                 # once (about 700 MB of wheels); CUDA 13.0 by default,
#                                             # SKYREELS_CUDA_RELEASE=12.8 for CUDA 12 drivers
#     source target/cuda/env.sh
#     cargo build --release --features cuda -p skyreels-cli
#
# The toolkit lands in target/cuda (or $SKYREELS_CUDA_PREFIX). Linking needs libcuda.so, which
# only a driver installs: the script builds a stub (every driver entry point cudarc declares,
# each returning CUDA_ERROR_STUB_LIBRARY) that is used at link time only; at run time the
# binary loads the driver's libcuda.so.1 and the CUDA libraries of the host (or of the
# Docker image, see Dockerfile). Kernels are compiled for CUDA_COMPUTE_CAP (default 90: H100,
# H200); set it before sourcing env.sh for another GPU (80: A100).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${SKYREELS_CUDA_PREFIX:-$ROOT/target/cuda}"
# The toolkit release decides the oldest driver that runs the build: candle's kernels are PTX that
# the driver compiles at start, and a driver rejects PTX newer than itself
# (CUDA_ERROR_UNSUPPORTED_PTX_VERSION). 13.0 runs on driver 580 and newer (the H100/H200 machines
# here); docs/cuda.md has the table, and 12.x (e.g. 12.8, driver 570) builds for CUDA 12 drivers.
# cudarc 0.19.10 (candle 0.11.1) knows CUDA 11.4 to 13.4.
CUDA_RELEASE="${SKYREELS_CUDA_RELEASE:-13.0}"
R="$CUDA_RELEASE"

mkdir -p "$PREFIX"
if [ ! -x "$PREFIX/venv/bin/pip" ]; then
    python3 -m venv "$PREFIX/venv"
fi
SITE="$("$PREFIX/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# NVIDIA's wheels: CUDA 13's share one folder (nvidia/cu13), CUDA 12's have one folder each.
case "$R" in
13.*)
    packages=("nvidia-cuda-nvcc==$R.*" "nvidia-cuda-crt==$R.*" "nvidia-nvvm==$R.*"
        "nvidia-cuda-runtime==$R.*" "nvidia-cuda-nvrtc==$R.*" "nvidia-cuda-cccl==$R.*"
        "nvidia-cublas==13.*" "nvidia-curand" "nvidia-nccl-cu13")
    parts=("$SITE/nvidia/cu13" "$SITE/nvidia/nccl")
    cudart=libcudart.so.13 cublas=libcublas.so.13
    ;;
12.*)
    packages=("nvidia-cuda-nvcc-cu12==$R.*" "nvidia-cuda-runtime-cu12==$R.*"
        "nvidia-cuda-nvrtc-cu12==$R.*" "nvidia-cuda-cccl-cu12==$R.*" "nvidia-cublas-cu12==12.*"
        "nvidia-curand-cu12" "nvidia-nccl-cu12")
    parts=()
    for p in cuda_nvcc cuda_runtime cuda_nvrtc cuda_cccl cublas curand nccl; do parts+=("$SITE/nvidia/$p"); done
    cudart=libcudart.so.12 cublas=libcublas.so.12
    ;;
*)
    echo "setup_cuda: SKYREELS_CUDA_RELEASE=$R: use a CUDA 12 or 13 release such as 12.8 or 13.0" >&2
    exit 2
    ;;
esac
"$PREFIX/venv/bin/pip" install --quiet --disable-pip-version-check "${packages[@]}"
# CUTLASS/CuTe headers for the FlashAttention-2 kernels (crates/skyreels-flash-attn); the wheel's
# Python dependencies are not needed for the headers.
"$PREFIX/venv/bin/pip" install --quiet --disable-pip-version-check --no-deps "nvidia-cutlass==4.2.0.0"

CUTLASS_INCLUDE_DIR="$SITE/cutlass_library/source/include"
if [ ! -e "$CUTLASS_INCLUDE_DIR/cute/tensor.hpp" ]; then
    echo "setup_cuda: no CuTe headers in $CUTLASS_INCLUDE_DIR; the nvidia-cutlass wheel layout changed?" >&2
    exit 1
fi

# A toolkit root in the layout build scripts expect: bin, include, lib64 (with the unversioned
# names the linker looks for), nvvm, merged from the wheels' folders. bin is copied, not linked:
# nvcc finds its headers and nvvm relative to where its binary really is.
CUDA_ROOT="$PREFIX/root"
rm -rf "$CUDA_ROOT"
mkdir -p "$CUDA_ROOT/bin" "$CUDA_ROOT/include" "$CUDA_ROOT/lib64"
for part in "${parts[@]}"; do
    [ -d "$part/bin" ] && cp -r "$part/bin/." "$CUDA_ROOT/bin/"
    [ -d "$part/include" ] && cp -rsn "$part/include/." "$CUDA_ROOT/include/"
    [ -d "$part/nvvm" ] && [ ! -e "$CUDA_ROOT/nvvm" ] && ln -s "$part/nvvm" "$CUDA_ROOT/nvvm"
    for lib in "$part"/lib/lib*.so*; do
        [ -e "$lib" ] || continue
        name="$(basename "$lib")"
        ln -sf "$lib" "$CUDA_ROOT/lib64/$name"
        case "$name" in
            *.so.*) base="${name%%.so.*}.so"; [ -e "$CUDA_ROOT/lib64/$base" ] || ln -s "$lib" "$CUDA_ROOT/lib64/$base" ;;
        esac
    done
done
for need in bin/nvcc nvvm include/cuda_runtime.h include/cuda_bf16.h include/cublas_v2.h "lib64/$cudart" "lib64/$cublas"; do
    if [ ! -e "$CUDA_ROOT/$need" ]; then
        echo "setup_cuda: $need is missing from the CUDA $R wheels; the wheel layout changed?" >&2
        exit 1
    fi
done

# libcuda.so link stub, from the driver API names cudarc declares.
CUDARC="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name 'cudarc-0.19.*' | sort | tail -n 1)"
if [ -z "$CUDARC" ]; then
    (cd "$ROOT" && cargo fetch --locked >/dev/null)
    CUDARC="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name 'cudarc-0.19.*' | sort | tail -n 1)"
fi
mkdir -p "$CUDA_ROOT/lib64/stubs"
grep -oh '\bcu[A-Z][A-Za-z0-9_]*\b' "$CUDARC/src/driver/sys/mod.rs" | sort -u |
    awk '{ printf "int %s(void) { return 34; }\n", $1 }' > "$PREFIX/libcuda_stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA_ROOT/lib64/stubs/libcuda.so" "$PREFIX/libcuda_stub.c"

cat > "$PREFIX/env.sh" <<EOF
# source this before \`cargo build --features cuda\` (written by scripts/setup_cuda.sh)
export CUDA_ROOT="$CUDA_ROOT"
export CUDA_HOME="$CUDA_ROOT"
export CUDA_PATH="$CUDA_ROOT"
export PATH="$CUDA_ROOT/bin:\$PATH"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export CUDARC_CUDA_VERSION="$(echo "$R" | awk -F. '{ printf "%d%02d0", $1, $2 }')"
export CUTLASS_INCLUDE_DIR="$CUTLASS_INCLUDE_DIR"
export LIBRARY_PATH="$CUDA_ROOT/lib64:$CUDA_ROOT/lib64/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
EOF
echo "CUDA $CUDA_RELEASE toolkit in $CUDA_ROOT ($("$CUDA_ROOT/bin/nvcc" --version | tail -n 1))"
echo "next: source $PREFIX/env.sh && cargo build --release --features cuda -p skyreels-cli"
