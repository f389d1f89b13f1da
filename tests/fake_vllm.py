"""A stand-in ``vllm`` package and a stand-in peer Python that runs it: the vLLM worker's protocol, tested without
vLLM (``tests/test_peers.py``, ``tests/training/test_data.py``)."""

from __future__ import annotations

import stat
import sys

import pytest

# A stand-in for vLLM's offline API as the worker uses it: "generation" counts up from the last prompt token and
# stops after a stop token; the n-gram method reports speculation counters like vLLM's metrics reader.
FAKE_VLLM = '''
import json
import os
__version__ = "0.0-fake"

class SamplingParams:
    def __init__(self, max_tokens, temperature=1.0, top_p=1.0, stop_token_ids=(), detokenize=True, seed=None):
        assert not detokenize
        self.max_tokens, self.stop = max_tokens, list(stop_token_ids)
        # "sampling" here: count up in steps of 2 from the last prompt token plus the seed
        self.stride, self.offset = (2, seed) if temperature > 0 else (1, 0)
        self.top_p = top_p

class _Metric:
    def __init__(self, name, value):
        self.name, self.value = name, value

class _Out:
    def __init__(self, ids):
        self.token_ids = ids

class _RequestOutput:
    def __init__(self, ids):
        self.outputs = [_Out(ids)]

class LLM:
    def __init__(self, **kwargs):
        if os.environ.get("FAKE_VLLM_FAIL"):
            raise RuntimeError("engine core failed to start")
        assert kwargs["dtype"] == "float32" and kwargs["skip_tokenizer_init"] and not kwargs["disable_log_stats"]
        assert os.environ["VLLM_DISABLE_COMPILE_CACHE"] == "1"  # a stale compile cache has crashed engine starts
        if os.environ.get("FAKE_VLLM_RECORD"):  # what the engine was built with, for the tests to read
            with open(os.environ["FAKE_VLLM_RECORD"], "w") as fh:
                json.dump({**kwargs, "threads_bind": os.environ["VLLM_CPU_OMP_THREADS_BIND"],
                           "kv_cache_gib": os.environ["VLLM_CPU_KVCACHE_SPACE"]}, fh)
        self.spec = kwargs.get("speculative_config")
        self.steps = 0
        print("vLLM log line on stdout")  # must not reach the protocol channel

    def generate(self, prompts, params, use_tqdm=True):
        outs = []
        for p in prompts:
            ids, t = [], p["prompt_token_ids"][-1] + params.offset
            while len(ids) < params.max_tokens:
                t = (t + params.stride) % 50
                ids.append(t)
                self.steps += 1
                if t in params.stop:
                    break
            outs.append(_RequestOutput(ids))
        return outs

    def reset_prefix_cache(self):
        return not os.environ.get("FAKE_VLLM_NO_RESET")

    def get_metrics(self):
        if not self.spec:
            return [_Metric("vllm:num_requests_running", 0)]
        return [_Metric("vllm:spec_decode_num_drafts", self.steps), _Metric("vllm:spec_decode_num_accepted_tokens",
                2 * self.steps), _Metric("vllm:spec_decode_num_draft_tokens", 8 * self.steps)]
'''


@pytest.fixture
def fake_python(tmp_path):
    """A 'peer Python': this interpreter with a stand-in vllm package first on its path (the bench strips the
    caller's PYTHONPATH, as a real peer venv must not see this package's environment)."""
    pkg = tmp_path / "fake" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_VLLM)
    (pkg / "inputs.py").write_text("def TokensPrompt(prompt_token_ids):\n"
                                   "    return {'prompt_token_ids': prompt_token_ids}\n")
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\nPYTHONPATH={tmp_path / 'fake'} exec {sys.executable} \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script
