"""Overlapping ``generate`` calls from many threads: every output token-identical to HF ``generate`` of the same
prompt alone, streamers see only their own call's tokens, batched or only serialised, on every drafter kind."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import jetspec_compile as js
from jetspec_compile.drafter import CorpusIndex, JetSpecDrafter, NGramDrafter
from tests.drafter.test_model import tiny_drafter
from tests.families import VOCAB, make_model

THREADS = 8
NEW = 20
#: self_check is tested elsewhere; here it would only capture one more graph per batch size
OPTIONS = dict(budget=8, max_cache_len=96, self_check=False, fallback=False)


def make_prompts(count=6, seed=0):
    """Prompts of different lengths; some repeat a phrase so the n-gram drafter has something to propose."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        ids = torch.randint(3, VOCAB, (5 + 3 * i,), generator=g).tolist()
        if i % 2:
            ids = ids + ids[:4]
        out.append(torch.tensor([ids]))
    return out


def reference(model, prompts, new=NEW):
    with torch.no_grad():
        return [model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=new, do_sample=False)
                for p in prompts]


def hammer(spec, prompts, rounds=2, **kwargs):
    """THREADS threads start together; thread t runs prompts t, t+1, ... (``rounds`` each). Returns
    ``[(prompt index, output, last_stats)]``."""
    start = threading.Barrier(THREADS)

    def work(t):
        start.wait()
        got = []
        for k in range(rounds):
            i = (t + k) % len(prompts)
            out = spec.generate(prompts[i], max_new_tokens=NEW, **kwargs)
            got.append((i, out, spec.last_stats))
        return got

    with ThreadPoolExecutor(THREADS) as pool:
        return [r for rs in pool.map(work, range(THREADS)) for r in rs]


def assert_identical(results, expected):
    assert len(results) >= THREADS
    for i, out, _ in results:
        assert torch.equal(out, expected[i]), f"prompt {i}: {out.tolist()} != {expected[i].tolist()}"


@pytest.fixture(scope="module")
def llama():
    model = make_model("llama")
    prompts = make_prompts()
    return model, prompts, reference(model, prompts)


@pytest.fixture(scope="module")
def specs(llama):
    """max_batch -> one n-gram model shared by the tests (each batch size's verifier is built once)."""
    model = llama[0]
    return {b: js.optimize(model, drafter=NGramDrafter(), max_batch=b, **OPTIONS) for b in (1, 8)}


@pytest.mark.parametrize("max_batch", [1, 8])
def test_threads_with_ngram_drafter_are_token_identical(llama, specs, max_batch):
    model, prompts, expected = llama
    spec = specs[max_batch]
    results = hammer(spec, prompts)
    assert_identical(results, expected)
    sizes = [stats["batch_size"] for _, _, stats in results]
    assert max(sizes) <= max_batch
    assert sum(stats["drafter_calls"] for _, _, stats in results) > 0  # the drafter did propose trees


def jetspec_with_corpus(model, prompts, expected):
    """The tiny random drafter with prompt lookup and a corpus of the target's own responses (long accepted
    paths: the drafter's per-row state is exercised at every step)."""
    _, net = tiny_drafter()  # its target is a copy of the same tiny llama
    records = [{"prompt_ids": p[0].tolist(), "response_ids": e[0, p.shape[1]:].tolist()}
               for p, e in zip(prompts[::2], expected[::2])]  # half the prompts: the corpus helps some rows only
    return JetSpecDrafter(net, width=2, corpus=CorpusIndex.from_records(records))


@pytest.mark.parametrize("max_batch", [1, 8])
def test_threads_with_jetspec_drafter_and_corpus_are_token_identical(llama, max_batch):
    model, prompts, expected = llama
    spec = js.attach_drafter(model, jetspec_with_corpus(model, prompts, expected), max_batch=max_batch, **OPTIONS)
    results = hammer(spec, prompts)
    assert_identical(results, expected)
    assert max(stats["tau"] for _, _, stats in results) > 2  # the corpus rows were accepted several at a time


def test_threads_on_onnxruntime_backend_are_token_identical(llama):
    pytest.importorskip("onnxruntime")
    model, prompts, expected = llama
    spec = js.optimize(model, drafter=NGramDrafter(), backend="onnxruntime", **OPTIONS)
    assert_identical(hammer(spec, prompts), expected)


@pytest.mark.slow  # Inductor compiles each graph for a minute or more on a 2-core CPU
def test_threads_on_inductor_backend_are_token_identical(llama):
    model, prompts, expected = llama
    spec = js.optimize(model, drafter=NGramDrafter(), backend="inductor", **OPTIONS)
    assert_identical(hammer(spec, prompts), expected)


class RecordingStreamer:
    """Records what ``generate`` streams (the HF streamer interface: ``put`` then ``end``)."""

    def __init__(self, hold: threading.Event | None = None):
        self.chunks, self.ended, self.hold = [], 0, hold
        self.holding = threading.Event()

    def put(self, value):
        if self.hold is not None and self.chunks:  # holds the loop at its first new token until released
            self.holding.set()
            self.hold.wait(timeout=60)
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended += 1

    @property
    def tokens(self):
        return [t for chunk in self.chunks for t in chunk]


@pytest.mark.parametrize("max_batch", [1, 8])
def test_each_streamer_receives_exactly_its_own_tokens(llama, specs, max_batch):
    model, prompts, expected = llama
    spec = specs[max_batch]
    start = threading.Barrier(THREADS)

    def work(t):
        i = t % len(prompts)
        streamer = RecordingStreamer()
        start.wait()
        out = spec.generate(prompts[i], max_new_tokens=NEW, streamer=streamer)
        return i, out, streamer

    with ThreadPoolExecutor(THREADS) as pool:
        for i, out, streamer in pool.map(work, range(THREADS)):
            assert torch.equal(out, expected[i])
            assert streamer.chunks[0] == prompts[i][0].tolist()
            assert streamer.tokens == out[0].tolist()  # the prompt, then its own new tokens only
            assert streamer.ended == 1


def test_calls_waiting_for_a_running_loop_join_one_batch(llama, specs):
    """While one call runs (held by its streamer), the seven others queue up; they then run as one batch of
    seven rows, each output still identical to running alone."""
    model, prompts, expected = llama
    spec = specs[8]
    release = threading.Event()
    holder = RecordingStreamer(hold=release)

    def first():
        return spec.generate(prompts[0], max_new_tokens=NEW, streamer=holder), spec.last_stats

    def other(t):
        i = t % len(prompts)
        return i, spec.generate(prompts[i], max_new_tokens=NEW), spec.last_stats

    with ThreadPoolExecutor(THREADS) as pool:
        running = pool.submit(first)
        assert holder.holding.wait(timeout=60)
        deadline = time.monotonic() + 60
        waiting = [pool.submit(other, t) for t in range(1, THREADS)]
        while len(spec._scheduler._queue) < THREADS - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
        out, stats = running.result()
        assert torch.equal(out, expected[0]) and stats["batch_size"] == 1
        for future in waiting:
            i, out, stats = future.result()
            assert torch.equal(out, expected[i])
            assert stats["batch_size"] == THREADS - 1


def test_mixed_lengths_sampling_and_greedy_calls_overlap_correctly(llama, specs):
    """Calls that cannot share a loop (sampling, another max_new_tokens) run in their own loops: a seeded sampling
    call gives what it gives alone, and greedy calls of both lengths stay identical to HF."""
    model, prompts, expected = llama
    spec = specs[8]
    short = reference(model, prompts, new=7)

    def sample(i):
        return spec.generate(prompts[i], max_new_tokens=NEW, do_sample=True, temperature=0.8, top_k=20,
                             generator=torch.Generator().manual_seed(i))

    alone = [sample(i) for i in range(2)]
    start = threading.Barrier(THREADS)

    def work(t):
        start.wait()
        i = t % len(prompts)
        if t < 2:
            return "sample", t, sample(t)
        if t % 2:
            return "short", i, spec.generate(prompts[i], max_new_tokens=7)
        return "greedy", i, spec.generate(prompts[i], max_new_tokens=NEW)

    with ThreadPoolExecutor(THREADS) as pool:
        for kind, i, out in pool.map(work, range(THREADS)):
            want = {"sample": alone, "short": short, "greedy": expected}[kind][i]
            assert torch.equal(out, want), (kind, i)


def test_models_sharing_a_target_and_a_drafter_take_turns(llama):
    """Two fresh models over one target module, given the same drafter object, called from 8 threads at once:
    their first verifier captures and their loops take turns on what they share."""
    model, prompts, expected = llama
    shared = NGramDrafter()
    models = [js.optimize(model, drafter=shared, **OPTIONS) for _ in range(2)]
    start = threading.Barrier(THREADS)

    def work(t):
        start.wait()
        i = t % len(prompts)
        return i, models[t % 2].generate(prompts[i], max_new_tokens=NEW), None

    with ThreadPoolExecutor(THREADS) as pool:
        assert_identical(list(pool.map(work, range(THREADS))), expected)


def test_a_failing_streamer_fails_only_its_own_call(llama, specs):
    model, prompts, expected = llama
    spec = specs[8]
    release = threading.Event()
    holder = RecordingStreamer(hold=release)

    class Broken(RecordingStreamer):
        def put(self, value):
            super().put(value)
            if len(self.chunks) > 2:
                raise RuntimeError("client went away")

    broken = Broken()
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(spec.generate, prompts[0], max_new_tokens=NEW, streamer=holder)
        assert holder.holding.wait(timeout=60)
        deadline = time.monotonic() + 60
        bad = pool.submit(spec.generate, prompts[1], max_new_tokens=NEW, streamer=broken)
        good = pool.submit(spec.generate, prompts[2], max_new_tokens=NEW)
        while len(spec._scheduler._queue) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
        assert torch.equal(first.result(), expected[0])
        with pytest.raises(RuntimeError, match="client went away"):
            bad.result()
        assert torch.equal(good.result(), expected[2])
        assert broken.ended == 1
    assert torch.equal(spec.generate(prompts[1], max_new_tokens=NEW), expected[1])  # nothing left behind


def test_max_batch_must_be_a_positive_int():
    with pytest.raises(ValueError, match="max_batch"):
        js.optimize(make_model("llama"), max_batch=0)
