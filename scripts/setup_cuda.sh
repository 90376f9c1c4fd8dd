#!/usr/bin/env bash
# Installs what `cargo build --release --features cuda` needs, on a machine with or without a GPU,
# from PyPI only (NVIDIA's CUDA 13 wheels: nvcc, headers, cudart, cuBLAS, cuRAND, NVRTC, and the
# CUTLASS headers flash attention compiles against), and writes an environment file that points
# candle's, cudarc's and skyreels-flash-attn's build scripts at it:
#
#     ./scripts/setup_cuda.sh                 # once (about 700 MB of wheels)
#     source target/cuda/env.sh
#     cargo build --release --features cuda -p skyreels-cli
#
# The toolkit lands in target/cuda (or $SKYREELS_CUDA_PREFIX). Linking needs libcuda.so, which
# only a driver installs: the script builds a stub (every driver entry point cudarc declares,
# each returning CUDA_ERROR_STUB_LIBRARY) that is used at link time only; at run time the
# binary loads the driver's libcuda.so.1 and the CUDA 13 libraries of the host (or of the
# Docker image, see Dockerfile). Kernels are compiled for CUDA_COMPUTE_CAP (default 90: H100,
# H200); set it before sourcing env.sh for another GPU (80: A100).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${SKYREELS_CUDA_PREFIX:-$ROOT/target/cuda}"
# cudarc 0.19.10 (candle 0.11.1) knows CUDA up to 13.4; the wheels of one release line up.
CUDA_RELEASE="${SKYREELS_CUDA_RELEASE:-13.2}"

mkdir -p "$PREFIX"
if [ ! -x "$PREFIX/venv/bin/pip" ]; then
    python3 -m venv "$PREFIX/venv"
fi
"$PREFIX/venv/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvcc==$CUDA_RELEASE.*" \
    "nvidia-cuda-crt==$CUDA_RELEASE.*" \
    "nvidia-nvvm==$CUDA_RELEASE.*" \
    "nvidia-cuda-runtime==$CUDA_RELEASE.*" \
    "nvidia-cuda-nvrtc==$CUDA_RELEASE.*" \
    "nvidia-cuda-cccl" \
    "nvidia-cublas==13.*" \
    "nvidia-curand"
# CUTLASS/CuTe headers for the FlashAttention-2 kernels (crates/skyreels-flash-attn); the wheel's
# Python dependencies are not needed for the headers.
"$PREFIX/venv/bin/pip" install --quiet --disable-pip-version-check --no-deps "nvidia-cutlass==4.2.0.0"

SITE="$("$PREFIX/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
CU="$SITE/nvidia/cu13"
CUTLASS_INCLUDE_DIR="$SITE/cutlass_library/source/include"
if [ ! -e "$CUTLASS_INCLUDE_DIR/cute/tensor.hpp" ]; then
    echo "setup_cuda: no CuTe headers in $CUTLASS_INCLUDE_DIR; the nvidia-cutlass wheel layout changed?" >&2
    exit 1
fi
for need in bin/nvcc include/cuda_runtime.h include/cuda_bf16.h lib/libcudart.so.13 lib/libcublas.so.13; do
    if [ ! -e "$CU/$need" ]; then
        echo "setup_cuda: $CU/$need is missing after the install; the wheel layout changed?" >&2
        exit 1
    fi
done

# A toolkit root in the layout build scripts expect: bin, include, lib64 (with the unversioned
# names the linker looks for), nvvm.
CUDA_ROOT="$PREFIX/root"
rm -rf "$CUDA_ROOT"
mkdir -p "$CUDA_ROOT/lib64"
ln -s "$CU/bin" "$CUDA_ROOT/bin"
ln -s "$CU/include" "$CUDA_ROOT/include"
[ -d "$CU/nvvm" ] && ln -s "$CU/nvvm" "$CUDA_ROOT/nvvm"
for lib in "$CU"/lib/lib*.so*; do
    name="$(basename "$lib")"
    ln -s "$lib" "$CUDA_ROOT/lib64/$name"
    case "$name" in
        *.so.*) base="${name%%.so.*}.so"; [ -e "$CUDA_ROOT/lib64/$base" ] || ln -s "$lib" "$CUDA_ROOT/lib64/$base" ;;
    esac
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
export CUDARC_CUDA_VERSION="${CUDA_RELEASE/./0}0"
export CUTLASS_INCLUDE_DIR="$CUTLASS_INCLUDE_DIR"
export LIBRARY_PATH="$CUDA_ROOT/lib64:$CUDA_ROOT/lib64/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
EOF
echo "CUDA $CUDA_RELEASE toolkit in $CUDA_ROOT ($("$CUDA_ROOT/bin/nvcc" --version | tail -n 1))"
echo "next: source $PREFIX/env.sh && cargo build --release --features cuda -p skyreels-cli"
