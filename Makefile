# One entry point for every task a contributor or CI runs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1
export GOMP_SPINCOUNT ?= 1000  # OpenMP threads sleep soon on a busy machine (services/vita/__init__.py says why)

.DEFAULT_GOAL := help
.PHONY: help setup system-deps proto duplex-model test test-fast test-deploy helm-template lint bench bench-gpu demo images train-tiny clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

# Each entry is COMMAND:PACKAGE (the package name when it differs from the command's).
SYSTEM_DEPS := espeak-ng sox ffmpeg prometheus chromium chromedriver:chromium-driver

system-deps:  ## install espeak-ng, sox, ffmpeg, prometheus (+promtool), chromium (+chromedriver) with apt-get when missing
	@missing=""; for d in $(SYSTEM_DEPS); do command -v $${d%%:*} >/dev/null || missing="$$missing $${d##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  for try in 1 2 3 4 5 6 7 8 9 10; do $$SUDO apt-get update -qq && break; \
	    echo "apt-get update failed (another apt-get running?): again in 10 s"; sleep 10; done; \
	  $$SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): requirements.lock requirements-nodeps.lock services/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: any other torch requirement would pull the CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.lock
	# Triton's server binary from the nvidia-pytriton wheel, without the dependencies it declares (why: see the file).
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.lock
	$(PY) -m pip install -q --no-deps -e services
	# The Python backend stub for this Python, where tritonserver looks for it (idempotent).
	$(PY) -m vita.llm.backends.triton.server prepare
	touch $(STAMP)

PROTO_OUT := services/vita/v1
PROTO_STAMP := $(PROTO_OUT)/.generated

# services/build_protos.py is also what setup.py runs, so a wheel built from services/ always ships vita/v1.
$(PROTO_STAMP): $(STAMP) $(wildcard protos/vita/v1/*.proto)
	$(PY) services/build_protos.py --force

proto: $(PROTO_STAMP)  ## generate Python gRPC code from protos/ into services/vita/v1 (not committed)

setup: system-deps $(STAMP) $(PROTO_STAMP)  ## virtualenv, pinned dependencies, the vita package, generated protos

test: setup duplex-model  ## the whole test suite (unit, integration, end-to-end)
	# The 25 slowest tests at the end: CI's output says where its time goes.
	$(PY) -m pytest tests --durations=25

# The duplex-tuned tiny model the e2e tests and the demo use: trained once (a few minutes on 2 cores), cached in
# $$VITA_HOME/models. Built here, with its progress bar, rather than inside a test's setup and its time limit.
duplex-model: setup  ## train (or reuse) the duplex-tuned tiny model in $VITA_HOME
	$(PY) -m vita.training.duplex

test-fast: setup  ## unit tests only
	$(PY) -m pytest tests/unit

test-deploy: setup  ## the Helm charts, dashboard and alerts: render, validate, run their args locally, real Prometheus
	$(PY) -m pytest tests/deploy

# Offline, with the Helm SDK the tests use (helm/render_charts.py): no cluster, no helm binary. VALUES (files, as
# `helm -f`, later ones win) needs CHART; NAMESPACE (vita) and RELEASE (vita, vita-train) default to the README's install.
OUT ?= .artifacts/helm-template
helm-template: $(STAMP)  ## render the charts to OUT/<chart>.yaml, like `helm template` [CHART=vita VALUES=f.yaml OUT=dir]
	$(PY) helm/render_charts.py --out $(OUT) $(foreach c,$(CHART),--chart $(c)) $(foreach v,$(VALUES),--values $(v)) \
	  $(if $(NAMESPACE),--namespace $(NAMESPACE)) $(if $(RELEASE),--release $(RELEASE))

lint: setup  ## ruff, and the import contracts in .importlinter (layers, model/ stays torch-only, no cycles)
	$(VENV)/bin/ruff check --config ruff.toml .
	PYTHONPATH=services $(VENV)/bin/lint-imports --no-logo  # the contracts in .importlinter

bench: setup  ## benchmarks; figures are appended to BENCHMARKS.md
	$(PY) benchmarks/llm_decode.py
	$(PY) benchmarks/serving.py
	$(PY) benchmarks/duplex_latency.py

bench-gpu: setup  ## on a machine with a CUDA GPU (and a CUDA build of torch): the decode table of issue 12
	$(PY) benchmarks/llm_decode_gpu.py

demo: setup  ## the local service stack on the tiny model and one-shot requests through its API
	$(PY) -m vita.demo

IMAGE ?= vita-omni/vita
VERSION := $(shell sed -n 's/^appVersion: "\(.*\)"/\1/p' helm/vita/Chart.yaml)
# The first container builder that can build here: a docker with a running daemon, podman, or buildah.
BUILDER = $(shell if docker info >/dev/null 2>&1; then echo docker build; \
  elif podman info >/dev/null 2>&1; then echo podman build; \
  elif command -v buildah >/dev/null 2>&1; then echo buildah bud; fi)

images:  ## build the vita image, CPU and CUDA targets (vita-omni/vita:VERSION-cpu|-cuda), the charts' default
	$(if $(BUILDER),,$(error make images: no container builder on this machine (a docker daemon, podman or buildah); the image cannot be built here))
	$(BUILDER) --target cpu -t $(IMAGE):$(VERSION)-cpu .
	$(BUILDER) --target cuda -t $(IMAGE):$(VERSION)-cuda .

TRAIN_TINY ?= .artifacts/train-tiny
TINY_ENV := VITA_TRAIN_DIR=$(TRAIN_TINY) VITA_CURRICULUM=$(TRAIN_TINY)/curriculum
# Each stage resumes a run of the same inputs and trains again one whose inputs changed (vita.training.inputs).
TINY_TRAIN := $(TINY_ENV) $(PY) -m vita.cli train --resume --on-input-change restart

train-tiny: setup  ## the synthetic curriculum, the three training stages and the export, on the tiny preset
	$(PY) -c "from vita.training.curriculum import build_curriculum; build_curriculum('$(TRAIN_TINY)/curriculum', seed=0)"
	$(PY) -m vita.cli pretrain-vision --preset tiny-112 --output $(TRAIN_TINY)/vision-encoder --threads 2
	$(PY) -m vita.cli pretrain-audio --preset tiny-112 --output $(TRAIN_TINY)/audio-encoder --threads 2
	$(TINY_TRAIN) --stage 1 --config training/configs/stage1_llm_tiny.yaml
	$(TINY_TRAIN) --stage 2 --config training/configs/stage2_vision_tiny.yaml
	$(TINY_TRAIN) --stage 2 --config training/configs/stage2_audio_tiny.yaml
	$(TINY_TRAIN) --stage 3 --config training/configs/stage3_multimodal_tiny.yaml
	$(PY) -m vita.cli export --checkpoint $(TRAIN_TINY)/stage3 --output $(TRAIN_TINY)/model --overwrite

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .artifacts
