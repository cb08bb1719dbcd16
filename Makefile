# UnsafeChain Platform. `make demo` and `make test` set up what is missing first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROTO_SRC := $(wildcard protos/unsafechain/v1/*.proto)
PROTO_OUT := build/proto
PROTO_STAMP := $(PROTO_OUT)/.stamp
SETUP_STAMP := $(VENV)/.setup-stamp
DEMO_CONFIG ?= pipelines/demo/demo.yaml

.PHONY: setup proto demo test bench lint format clean

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
	touch $(PROTO_OUT)/unsafechain/__init__.py $(PROTO_OUT)/unsafechain/v1/__init__.py
	touch $@

$(SETUP_STAMP): pyproject.toml $(PROTO_STAMP)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

## demo: the main job, an embedded build on the bundled sample prompts with stand-in models
demo: setup
	$(VENV)/bin/unsafechain standins --out .cache/standins
	$(VENV)/bin/unsafechain build --config $(DEMO_CONFIG)

## test: the whole test suite
test: setup
	$(PY) -m pytest -q

## bench: the judge service micro-batching against one-by-one judging, 32 concurrent clients
bench: setup
	$(PY) bench/judge_batching.py --clients 32 --requests 16

## lint: ruff lint and format check
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) build .cache out
