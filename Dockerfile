# syntax=docker/dockerfile:1
#
# Two images from one Dockerfile (docs/deploy.md):
#
#   docker build --target service    -t beyond-service .     gateway, RQ workers, TorchServe auth proxy (no torch)
#   docker build --target torchserve -t beyond-torchserve .  TorchServe + handlers + demo archives (CPU torch)
#
# GPU: docker build --target torchserve \
#        --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t beyond-torchserve:cuda .
# The CUDA wheels carry the CUDA user-space libraries; the node's driver comes in through the
# NVIDIA container runtime. TORCHSERVE_BASE swaps the base image (e.g. an nvidia/cuda runtime
# image); it must be Debian/Ubuntu based, and Python 3.11 is installed from apt if it lacks it.
#
# Both run as the unprivileged user beyond (10001) and hold no secret: API keys, the
# TorchServe token and the Redis URL come from the environment at run time.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TORCHSERVE_BASE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- service: build
FROM ${PYTHON_IMAGE} AS service-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/venv
# versions from requirements.lock: the images ship what `make test` audits
COPY docker/requirements-service.txt requirements.lock ./
RUN /opt/venv/bin/pip install --no-cache-dir -r requirements-service.txt -c requirements.lock
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY service ./service
COPY handlers ./handlers
COPY model_store ./model_store
# the project's code only: its torch-side dependencies stay out of this image
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . \
    && /opt/venv/bin/python -c "import sys, service.gateway.app, service.jobs.worker, service.torchserve_proxy, service.healthcheck; sys.exit('torch' in sys.modules)"

# ---------------------------------------------------------------- service: runtime
FROM ${PYTHON_IMAGE} AS service
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 beyond \
    && useradd --system --uid 10001 --gid beyond --home-dir /var/lib/beyond --shell /usr/sbin/nologin beyond \
    && install -d -o beyond -g beyond /var/lib/beyond /data
COPY --from=service-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BEYOND_ENVIRONMENT=production \
    BEYOND_HOST=0.0.0.0 \
    BEYOND_PORT=8000 \
    BEYOND_STATE_DIR=/var/lib/beyond \
    BEYOND_DATA_DIR=/data/datasets
WORKDIR /var/lib/beyond
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
ENTRYPOINT ["tini", "--"]
# the gateway, as model_store.stack starts it; workers: python -m service.jobs.worker
CMD ["sh", "-c", "exec uvicorn --factory service.gateway.app:app_from_env --host \"$BEYOND_HOST\" --port \"$BEYOND_PORT\" --timeout-graceful-shutdown 5 --no-server-header --log-level info"]

# ---------------------------------------------------------------- torchserve: base
FROM ${TORCHSERVE_BASE} AS torchserve-base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN packages=(tini) \
    && if ! command -v python3.11 >/dev/null; then packages+=(python3.11 python3.11-venv); fi \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}" \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 beyond \
    && useradd --system --uid 10001 --gid beyond --home-dir /var/lib/beyond --shell /usr/sbin/nologin beyond \
    && install -d -o beyond -g beyond /var/lib/beyond /data
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# ---------------------------------------------------------------- torchserve: build
FROM torchserve-base AS torchserve-build
# torch and torchvision as pinned in pyproject.toml, from the index that picks CPU or CUDA
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# 1: archive the four demo models at build time (from the shipped weights in model_store/demo_weights)
ARG DEMO_ARCHIVES=1
WORKDIR /src
RUN python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
COPY pyproject.toml README.md requirements.lock ./
COPY protocol ./protocol
COPY service ./service
COPY handlers ./handlers
COPY model_store ./model_store
RUN /opt/venv/bin/pip install --no-cache-dir -c requirements.lock .
ENV BEYOND_MODEL_STORE_DIR=/opt/beyond/model-store
RUN if [ "$DEMO_ARCHIVES" = "1" ]; then /opt/venv/bin/python -m model_store.build --demo; fi \
    && mkdir -p "$BEYOND_MODEL_STORE_DIR/archives"

# ---------------------------------------------------------------- torchserve: runtime
FROM torchserve-base AS torchserve
# TorchServe's frontend is Java
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*
COPY --from=torchserve-build /opt/venv /opt/venv
COPY --from=torchserve-build /opt/beyond/model-store/archives /opt/beyond/model-store/archives
ENV PATH=/opt/venv/bin:$PATH \
    BEYOND_MODEL_STORE_DIR=/opt/beyond/model-store \
    BEYOND_STATE_DIR=/var/lib/beyond \
    BEYOND_TORCHSERVE_PORT=8080 \
    BEYOND_TORCHSERVE_MANAGEMENT_PORT=8081 \
    BEYOND_TORCHSERVE_METRICS_PORT=8082 \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /var/lib/beyond
USER 10001:10001
# TorchServe's /ping with the container's own inference token (key_file.json in its state)
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-m", "service.healthcheck", "torchserve"]
ENTRYPOINT ["tini", "--"]
# every TorchServe API listens on 127.0.0.1 only, as locally: reach it through the proxy
# (service.torchserve_proxy from the service image) in the same network namespace
CMD ["python", "-m", "model_store.torchserve_process"]
