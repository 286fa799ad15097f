# The two commands of the README:  `make demo`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= pipelines/configs/toyworld/main.yaml
RUN ?= runs/main
PYTEST_ARGS ?= -m "not slow"

.PHONY: setup demo test test-all test-slow test-cluster bench toyworld clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch + torchvision first, as a pair that imports together (the CUDA build; it also runs on
	# the CPU). open_clip_torch -> timm -> torchvision would otherwise swap torch under us.
	$(BIN)/pip install -q -c constraints.txt torch torchvision
	$(BIN)/pip install -q -c constraints.txt -e ".[ray,test]"
	# facenet-pytorch ships the MTCNN weights; its own pins (torch<2.3) are stale, hence --no-deps.
	$(BIN)/pip install -q -c constraints.txt --no-deps facenet-pytorch
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/fairness job --config $(CONFIG) --run-dir $(RUN)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: PYTEST_ARGS=
test-all: test

# The tests marked slow (the two-node Ray cluster, fault recovery, the toy walkthrough, a short serve soak);
# CI runs them after the default suite.
test-slow: setup
	$(BIN)/python -m pytest -m slow

# Only the local two-node Ray cluster test (~3 min).
test-cluster: setup
	$(BIN)/python -m pytest -m slow tests/test_ray_multinode.py

bench: setup
	$(BIN)/python -m fairness.bench --out bench/results

toyworld: setup
	$(BIN)/fairness toyworld build

clean:
	rm -rf $(VENV) runs .pytest_cache
