"""Peer engines in the benchmark, without vLLM: the worker's JSON protocol against a stand-in ``vllm`` package run
by a stand-in peer Python, the bench's handling of a missing peer environment, and peer columns computed from
runs of a tiny model. With the real peer environment (``make peers``), a ``peers``-marked test checks vLLM's
greedy output against HF's."""

from __future__ import annotations

import os
from argparse import Namespace

import pytest
import torch

import jetspec_compile as js
from jetspec_compile.bench import (batch_markdown, identity_report, markdown, run_batches, run_interleaved,
                                   start_peers, step_cost_markdown, summarize)
from jetspec_compile.drafter import NGramDrafter
from jetspec_compile.peers import PeerConfig, PeerResult, PeerUnavailable, VLLMPeer, find_peer_python

from .families import make_model

def test_worker_protocol_outputs_stop_tokens_and_spec_counters(fake_python, tmp_path):
    log = tmp_path / "worker.log"
    with VLLMPeer(PeerConfig(model="m", method="ngram", threads=1, preload=False), python=fake_python,
                  log=log) as peer:
        assert peer.version == "0.0-fake" and peer.ld_preload == ""
        first = peer.generate([[5, 7], [40]], 6, stop_token_ids=[10])
        assert first.outputs == [[8, 9, 10], [41, 42, 43, 44, 45, 46]]  # row 0 stopped at its stop token
        assert first.seconds > 0
        assert first.spec_decode == {"drafts": 9, "draft_tokens": 72, "accepted_tokens": 18}
        second = peer.generate([[1]], 2)
        assert second.outputs == [[2, 3]] and second.spec_decode["drafts"] == 2  # counters per call, not cumulative
        sampled = peer.generate([[1]], 3, temperature=0.7, top_p=0.9, seed=5)
        assert sampled.outputs == [[8, 10, 12]]  # temperature and seed reached SamplingParams
        with pytest.raises(ValueError, match="top_p"):
            peer.generate([[1]], 3, temperature=0.7, top_p=0.0)
        assert second.prefill_seconds is None
        probed = peer.generate([[1]], 2, prefill_probe=True)
        assert probed.outputs == [[2, 3]] and probed.prefill_seconds > 0
        assert probed.spec_decode["drafts"] == 2  # the probe's own step is not counted as the request's
        assert peer.generate([[1]], 2).spec_decode["drafts"] == 2
    assert "vLLM log line on stdout" in log.read_text()  # vLLM's prints went to the log, not the protocol


def test_prefill_probe_gives_none_where_the_prefix_cache_cannot_be_reset(fake_python, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_NO_RESET", "1")
    with VLLMPeer(PeerConfig(model="m", threads=1, preload=False), python=fake_python) as peer:
        probed = peer.generate([[1]], 2, prefill_probe=True)
    assert probed.outputs == [[2, 3]] and probed.prefill_seconds is None  # not a time taken from the cache


def test_worker_failure_is_a_clear_error_with_the_log(fake_python, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_FAIL", "1")
    with pytest.raises(PeerUnavailable, match="engine core failed to start(.|\n)*Traceback"):
        VLLMPeer(PeerConfig(model="m", threads=1, preload=False), python=fake_python, log=tmp_path / "w.log")


def test_missing_peer_environment_says_how_to_create_it(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("JETSPEC_VLLM_PYTHON", raising=False)
    with pytest.raises(PeerUnavailable, match="make peers"):
        find_peer_python(tmp_path / "nope" / "python")
    args = Namespace(peers=["vllm"], peer_python=str(tmp_path / "nope" / "python"), batch=[], threads=1,
                     vllm_kv_gib=1, vllm_spec_tokens=8, vllm_lookup=[2, 5])
    assert start_peers(args, tmp_path, tmp_path) == {}  # the bench goes on without the peers
    assert "make peers" in capsys.readouterr().out
    with pytest.raises(ValueError, match="method must be"):
        PeerConfig(model="m", method="eagle")


class GreedyPeer:
    """In-process stand-in for a peer engine: HF greedy decoding, row by row (or wrong from token ``wrong_at``)."""

    def __init__(self, model, wrong_at=None):
        self.model, self.wrong_at = model, wrong_at
        self.sampling = []  # the sampling arguments of each sampled request

    def generate(self, prompts, max_new_tokens, stop_token_ids=(), prefill_probe=False, **sampling):
        if sampling:
            self.sampling.append(sampling)
        outs = []
        for ids in prompts:
            x = torch.tensor([ids])
            new = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                      do_sample=False)[0, len(ids):].tolist()
            if self.wrong_at is not None and len(new) > self.wrong_at:
                new[self.wrong_at] = (new[self.wrong_at] + 1) % 97
            outs.append(new)
        return PeerResult(outs, 0.01, {"drafts": 4, "draft_tokens": 32, "accepted_tokens": 6},
                          0.002 if prefill_probe else None)


def test_bench_peer_columns_identity_and_batches():
    model = make_model("llama")
    model.generation_config.eos_token_id = None  # random weights: run every row to max_new_tokens
    spec = js.optimize(model, drafter=NGramDrafter(), budget=4, max_cache_len=128)
    peers = {"vllm": GreedyPeer(model), "vllm-ngram": GreedyPeer(model, wrong_at=3)}
    g = torch.Generator().manual_seed(0)
    prompts = {"s": [torch.randint(3, 97, (n,), generator=g).tolist() for n in (6, 9, 7)]}
    methods = ["hf", "vllm", "vllm-ngram", "jetspec-b4"]
    records = run_interleaved(model, {"jetspec-b4": spec}, prompts, methods, max_new_tokens=8, progress=False,
                              peers=peers)
    by = {(r["method"], r["prompt"]): r for r in records}
    assert all(by["vllm", i]["identical"] and by["jetspec-b4", i]["identical"] for i in range(3))
    assert not any(by["vllm-ngram", i]["identical"] for i in range(3))
    assert {by["vllm-ngram", i]["first_difference"] for i in range(3)} == {3}
    summary = summarize(records, methods, peers=["vllm", "vllm-ngram"])
    entries = summary["s"]
    assert entries["vllm-ngram"]["peer_accepted_length"] == 1 + 6 / 4
    best = max(("vllm", "vllm-ngram"), key=lambda p: entries[p]["tokens_per_second"])
    ratios = [by["jetspec-b4", i]["tokens_per_second"] / by[best, i]["tokens_per_second"] for i in (1, 2)]
    assert entries["jetspec-b4"]["vs_peer"]["peer"] == best
    assert entries["jetspec-b4"]["vs_peer"]["min"] == min(ratios)
    table = markdown(summary, methods)
    assert "vs strongest peer" in table and "(strongest)" in table and "2.50†" in table
    timed = [by[m, i] for m in methods for i in (1, 2)]
    ours = [r for r in timed if r["method"] == "jetspec-b4"]
    ms_step = 1e3 * sum(r["seconds"] for r in ours) / sum(sum(r["histogram"].values()) for r in ours)
    vllm_token = 1e3 * sum(r["seconds"] for r in timed if r["method"] == "vllm") / (2 * 8)
    assert entries["jetspec-b4"]["ms_per_step"] == pytest.approx(ms_step)
    assert entries["vllm"]["ms_per_step"] == pytest.approx(vllm_token)
    assert entries["jetspec-b4"]["step_vs_plain_peer"] == {"peer": "vllm", "ratio": pytest.approx(ms_step / vllm_token)}
    assert "ms_per_step" not in entries["vllm-ngram"]  # speculation: its steps are not counted, so no step cost
    prefill = sum(r["prefill_seconds"] for r in ours)
    assert 0 < prefill < sum(r["seconds"] for r in ours)
    decode_step = 1e3 * (sum(r["seconds"] for r in ours) - prefill) / sum(sum(r["histogram"].values()) for r in ours)
    assert entries["jetspec-b4"]["ms_per_decode_step"] == pytest.approx(decode_step)
    assert entries["jetspec-b4"]["prefill_ms"] == pytest.approx(1e3 * prefill / 2)
    assert "prefill_seconds" in by["vllm", 1] and "prefill_seconds" not in by["vllm-ngram", 1]  # plain peer only
    vllm_decode = 1e3 * (2 * 0.01 - 2 * 0.002) / (2 * 8 - 2)  # the probe also gave each prompt's first token
    assert entries["vllm"]["ms_per_decode_step"] == pytest.approx(vllm_decode)
    assert entries["jetspec-b4"]["decode_step_vs_plain_peer"]["ratio"] == pytest.approx(decode_step / vllm_decode)
    cost = step_cost_markdown(summary, methods)
    assert f"| s | jetspec-b4 | {ms_step:.1f} | {decode_step:.1f} (prefill" in cost
    assert f"| {decode_step / vllm_decode:.2f}× |" in cost
    assert "| s | vllm |" in cost and "(reference)" in cost
    assert step_cost_markdown(summarize(records, methods), methods) == ""  # no peer, no table
    report = identity_report(records, methods)
    assert "vllm: 2/2 identical" in report and "vllm-ngram: 0/2 identical; differ: s #1 at new token 3" in report

    batches = run_batches(model, {"jetspec-b4": spec}, prompts["s"], [3], max_new_tokens=8, peers=peers,
                          warmup_tokens=2, progress=False)
    rows = {r["method"]: r for r in batches}
    assert rows["jetspec-b4"]["rows_identical"] == 3 and rows["vllm"]["rows_identical"] == 3
    assert rows["vllm-ngram"]["rows_identical"] == 0 and rows["hf"]["new_tokens"] == 24
    assert set(rows["jetspec-b4"]["budgets_used"]) <= {1, 4} and rows["jetspec-b4"]["budgets_used"]
    table = batch_markdown(batches, peers=list(peers))
    assert "| 3 | jetspec-b4 |" in table and "| 3/3 |" in table and "| 0/3 |" in table


def test_bench_sampled_peers_are_compared_with_sampled_methods():
    model = make_model("llama")
    model.generation_config.eos_token_id = None
    spec = js.optimize(model, drafter=NGramDrafter(), budget=4, max_cache_len=128)
    peers = {"vllm": GreedyPeer(model), "vllm-ngram": GreedyPeer(model)}
    g = torch.Generator().manual_seed(1)
    prompts = {"s": [torch.randint(3, 97, (n,), generator=g).tolist() for n in (6, 9, 7)]}
    sample = {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
    methods = ["hf", "vllm", "jetspec-b4", "hf-sample", "vllm-sample", "vllm-ngram-sample", "jetspec-b4-sample"]
    records = run_interleaved(model, {"jetspec-b4": spec}, prompts, methods, max_new_tokens=8, progress=False,
                              peers=peers, sample=sample)
    assert peers["vllm"].sampling == [{"temperature": 0.7, "top_p": 0.9, "seed": i} for i in range(3)]
    assert all(r["identical"] is None for r in records if r["method"].endswith("-sample"))
    entries = summarize(records, methods, peers=["vllm", "vllm-ngram"])["s"]
    by = {(r["method"], r["prompt"]): r for r in records}
    ratios = [by["vllm-sample", i]["tokens_per_second"] / by["hf-sample", i]["tokens_per_second"] for i in (1, 2)]
    assert entries["vllm-sample"]["speedup_min"] == min(ratios)  # sampled peers against HF sampling
    best = max(("vllm-sample", "vllm-ngram-sample"), key=lambda p: entries[p]["tokens_per_second"])
    assert entries["jetspec-b4-sample"]["vs_peer"]["peer"] == best
    assert entries["jetspec-b4"]["vs_peer"]["peer"] == "vllm"  # greedy against the greedy peer only


def _peer_python_or_skip():
    try:
        return find_peer_python()
    except PeerUnavailable as err:
        pytest.skip(str(err))


@pytest.mark.peers
def test_vllm_greedy_matches_hf_on_a_short_prompt(tmp_path):
    """The real vLLM CPU engine (``make peers``) on the real model: its greedy tokens equal HF's."""
    from jetspec_compile.models import load_smollm2, smollm2_path
    from jetspec_compile.prompts import encode_chat

    python = _peer_python_or_skip()
    model, tok = load_smollm2()
    ids = encode_chat(tok, "Write a Python function that returns the square of a number.")
    x = torch.tensor([ids])
    ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False)[0, len(ids):]
    cfg = PeerConfig(model=str(smollm2_path()), threads=min(2, os.cpu_count() or 1))
    with VLLMPeer(cfg, python=python, log=tmp_path / "vllm.log") as peer:
        out = peer.generate([ids], 24, stop_token_ids=[model.generation_config.eos_token_id])
    assert out.outputs[0] == ref.tolist()


@pytest.mark.peers
def test_vllm_regeneration_equals_hf_regeneration(tmp_path):
    """``train-drafter --generator vllm``'s data: the real vLLM engine, batched, writes HF's own greedy responses."""
    from jetspec_compile.models import load_smollm2
    from jetspec_compile.prompts import load_prompts
    from jetspec_compile.training.data import read_sequences, regenerate
    from jetspec_compile.training.recipe import Recipe, response_engine

    python = _peer_python_or_skip()
    model, tok = load_smollm2()
    prompts = [("sharegpt", p) for p in load_prompts("sharegpt", "train", 4)]
    regenerate(model, tok, prompts, tmp_path / "hf.jsonl", max_new_tokens=24, batch_size=4)
    with response_engine(model, Recipe(generator="vllm", gen_batch=4), max_tokens=512, python=python,
                         log=tmp_path / "vllm.log") as engine:
        regenerate(None, tok, prompts, tmp_path / "vllm.jsonl", max_new_tokens=24, batch_size=4, engine=engine)
    assert read_sequences(tmp_path / "vllm.jsonl") == read_sequences(tmp_path / "hf.jsonl")


def test_bench_settles_before_every_run_outside_the_timing(monkeypatch):
    """``settle``: an idle pause before each run (every engine starts from the same idle machine), never timed."""
    import jetspec_compile.bench as bench

    model = make_model("llama")
    model.generation_config.eos_token_id = None
    spec = js.optimize(model, drafter=NGramDrafter(), budget=4, max_cache_len=128)
    events = []
    monkeypatch.setattr(bench.time, "sleep", lambda s: events.append(("sleep", s)))

    class Peer(GreedyPeer):
        def generate(self, *args, **kwargs):
            events.append(("run", "vllm"))
            return super().generate(*args, **kwargs)

    g = torch.Generator().manual_seed(0)
    prompts = {"s": [torch.randint(3, 97, (n,), generator=g).tolist() for n in (6, 9)]}
    methods = ["hf", "vllm", "jetspec-b4"]
    records = run_interleaved(model, {"jetspec-b4": spec}, prompts, methods, max_new_tokens=4, progress=False,
                              peers={"vllm": Peer(model)}, settle=0.25)
    assert len(records) == 6 and events.count(("sleep", 0.25)) == 6
    assert [e for e in events if e[0] == "run"] == [("run", "vllm")] * 2
    assert all(events[i - 1] == ("sleep", 0.25) for i, e in enumerate(events) if e[0] == "run")
    events.clear()
    run_interleaved(model, {"jetspec-b4": spec}, prompts, methods, max_new_tokens=4, progress=False,
                    peers={"vllm": Peer(model)})
    assert not any(e[0] == "sleep" and e[1] > 0 for e in events)
