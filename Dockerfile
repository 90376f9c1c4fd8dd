# skyreels serve on one NVIDIA GPU (CUDA 13, bf16). Build and run:
#
#   docker build -t skyreels .
#   docker run --gpus all -p 8000:8000 -v "$HOME/.cache/huggingface:/data/hf" skyreels
#
# Weights are not in the image: they come from the mounted Hugging Face cache (fill it with
# `skyreels download` or let the container download on first start), or from a mounted local
# pipeline folder (`-v /models/skyreels:/models -e SKYREELS_MODEL=/models`). Kernels are built for
# CUDA_COMPUTE_CAP (90: H100/H200; 80: A100, 89: L40S/RTX 4090).
ARG CUDA_VERSION=13.0.0

FROM rust:1-bookworm AS build
ARG CUDA_VERSION
ARG CUDA_COMPUTE_CAP=90
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# nvcc, headers and CUDA libraries from PyPI (the same script developers use), then the binary
RUN SKYREELS_CUDA_RELEASE="${CUDA_VERSION%.*}" ./scripts/setup_cuda.sh \
    && . target/cuda/env.sh \
    && cargo build --release --locked --features cuda -p skyreels-cli \
    && cp target/release/skyreels /usr/local/bin/skyreels

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 skyreels \
    && mkdir -p /data/hf /data/outputs \
    && chown -R skyreels /data
COPY --from=build /usr/local/bin/skyreels /usr/local/bin/skyreels
USER skyreels
ENV HF_HOME=/data/hf \
    SKYREELS_MODEL=skyreels-v1-i2v \
    RUST_LOG=info
VOLUME ["/data/hf", "/data/outputs"]
EXPOSE 8000
# clients use the host's name, not the container's address: pass it as SKYREELS_ALLOWED_HOSTS (or set
# SKYREELS_PUBLIC_URL behind a proxy), else their requests are refused (400) as a DNS-rebinding guard
# /health answers as soon as the server listens; /ready once the weights are loaded
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/health || exit 1
ENTRYPOINT ["skyreels", "serve", "--host", "0.0.0.0", "--port", "8000", "--device", "cuda", \
    "--output-dir", "/data/outputs"]
