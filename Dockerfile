# syntax=docker/dockerfile:1.7
#
# NOTE: written and reviewed, never built in this repository's CI: the
# development machines have no Docker engine and reach only package registries
# (no base-image pulls, no download.pytorch.org). tests/test_dockerfile.py
# checks its structure instead.
#
# One Dockerfile, three images (the Helm chart's defaults name them):
#   docker build --target operator   -t ghcr.io/edgeslim/operator:0.1.0   .
#   docker build --target compressor -t ghcr.io/edgeslim/compressor:0.1.0 .
#   docker build --target serving    -t ghcr.io/edgeslim/serving:0.1.0    .
# Each installs only its role's extra from pyproject.toml, so the edge image
# carries onnxruntime but no torch.

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: the edgeslim wheel; build tooling stays out of the final images --
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the wheel is built from (see .dockerignore), so edits to tests or
# docs do not invalidate this layer.
COPY pyproject.toml README.md ./
COPY edgeslim ./edgeslim
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- runtime-base: a non-root user shared by the three images ----------------------
FROM ${PYTHON_IMAGE} AS runtime-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# 65532 matches the chart's runAsUser (and distroless' "nonroot"); a numeric
# USER lets the kubelet verify runAsNonRoot without reading /etc/passwd.
RUN groupadd --system --gid 65532 edgeslim \
 && useradd --system --uid 65532 --gid 65532 --home-dir /home/edgeslim --create-home \
        --shell /usr/sbin/nologin edgeslim
WORKDIR /home/edgeslim
LABEL org.opencontainers.image.source="https://github.com/edgeslim/edgeslim" \
      org.opencontainers.image.licenses="Apache-2.0"

# --- operator: kopf + the Kubernetes client ------------------------------------------
FROM runtime-base AS operator
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install "$(ls /wheels/edgeslim-*.whl)[operator]"
USER 65532:65532
# /metrics, /healthz and /readyz (EDGESLIM_METRICS_PORT).
EXPOSE 8080
ENTRYPOINT ["edgeslim"]
CMD ["operator"]

# --- compressor: torch (CPU), onnx, onnxruntime; runs as the Job's container -------
FROM runtime-base AS compressor
# The CPU-only torch wheel from the PyTorch index: PyPI's default Linux wheel
# bundles CUDA (gigabytes a CPU-only Job never uses). Installed first so the
# `compressor` extra's `torch>=2.4` is already satisfied and pip keeps it.
# Needs https://download.pytorch.org at build time (not reachable from the
# development machines; fine on a normal build host or CI runner).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The same range as pyproject's `compressor` extra; pin it (e.g. torch==2.15.0)
# for reproducible release images.
ARG TORCH_REQUIREMENT="torch>=2.4"
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_REQUIREMENT}"
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install "$(ls /wheels/edgeslim-*.whl)[compressor]"
USER 65532:65532
ENTRYPOINT ["edgeslim"]
CMD ["compress", "--help"]

# --- serving: the edge model server; onnxruntime and a small ASGI stack only ------
FROM runtime-base AS serving
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install "$(ls /wheels/edgeslim-*.whl)[serving]"
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["edgeslim"]
CMD ["serve", "--help"]
