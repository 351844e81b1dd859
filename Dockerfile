# syntax=docker/dockerfile:1
# One image for every vita service and the training job; entrypoint `vita` (vita serve ..., vita train ...).
#   docker build --target cpu  -t vita-omni/vita:0.1.0-cpu  .    # torch's CPU wheel
#   docker build --target cuda -t vita-omni/vita:0.1.0-cuda .    # torch's CUDA wheel (driver from the node)
# `make images` builds both. Runs as the non-root user vita (uid 10001), with a read-only root filesystem in the
# Helm charts: VITA_HOME (/var/lib/vita) and /tmp are the writable volumes.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128

# --- the virtualenv, one per torch variant ---------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/vita
ENV PATH=/opt/vita/bin:$PATH
WORKDIR /src

FROM build AS build-cpu
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX
RUN pip install --index-url ${TORCH_CPU_INDEX} torch==${TORCH_VERSION}

FROM build AS build-cuda
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX
RUN pip install --index-url ${TORCH_CUDA_INDEX} torch==${TORCH_VERSION}

# Pinned dependencies, the generated gRPC code and the vita package, on top of either torch.
FROM build-cpu AS app-cpu
COPY requirements.lock /src/
# triton: the GPU image's MoE kernel (torch's CUDA build brings the same pin); a CPU image has no use for it.
RUN grep -v -E '^(torch|triton)==' requirements.lock > /tmp/req.txt && pip install -r /tmp/req.txt
COPY protos /src/protos
COPY services /src/services
RUN python -m grpc_tools.protoc -I protos --python_out=services --pyi_out=services --grpc_python_out=services \
      protos/vita/v1/*.proto \
 && echo '"""Generated from protos/vita/v1; do not edit."""' > services/vita/v1/__init__.py \
 && pip install --no-deps ./services

FROM build-cuda AS app-cuda
COPY requirements.lock /src/
RUN grep -v '^torch==' requirements.lock > /tmp/req.txt && pip install -r /tmp/req.txt
COPY protos /src/protos
COPY services /src/services
RUN python -m grpc_tools.protoc -I protos --python_out=services --pyi_out=services --grpc_python_out=services \
      protos/vita/v1/*.proto \
 && echo '"""Generated from protos/vita/v1; do not edit."""' > services/vita/v1/__init__.py \
 && pip install --no-deps ./services

# --- the runtime images ------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# ffmpeg libraries come with the PyAV wheel; espeak-ng speaks the Realtime gateway's answers and makes the spoken
# questions of stage-3 training data.
RUN apt-get update \
 && apt-get install -y --no-install-recommends espeak-ng \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 vita \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/vita --create-home --shell /usr/sbin/nologin vita
ENV PATH=/opt/vita/bin:$PATH \
    VITA_HOME=/var/lib/vita \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GOMP_SPINCOUNT=1000
COPY model_repository /opt/vita-model-repository
COPY training /opt/vita-training
WORKDIR /var/lib/vita
USER 10001:10001
ENTRYPOINT ["vita"]
CMD ["--help"]

FROM runtime AS cpu
COPY --from=app-cpu /opt/vita /opt/vita

FROM runtime AS cuda
COPY --from=app-cuda /opt/vita /opt/vita
