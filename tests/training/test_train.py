"""Drafter training: it learns, it is deterministic, it resumes, it refuses bad input."""

import dataclasses

import pytest
import torch

from jetspec_compile.drafter import DrafterConfig, load_drafter
from jetspec_compile.training.train import (
    TrainConfig,
    _Teacher,
    block_mask,
    compute_features,
    evaluate,
    grow_layers,
    model_fingerprint,
    train_drafter,
)
from tests.families import VOCAB, make_model

TAPS = (0, 2)


@pytest.fixture(scope="module")
def setup():
    """A tiny Llama and greedy self-distilled sequences: the drafter must learn the target's own continuations."""
    torch.manual_seed(0)
    target = make_model("llama")
    records = []
    for i in range(24):
        prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(i))
        out = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False)
        records.append({"prompt_ids": prompt[0].tolist(), "response_ids": out[0, 6:].tolist()})
    feats = compute_features(target, records, TAPS, progress=False)
    cfg = DrafterConfig.for_target(target.config, TAPS, num_layers=1, block_size=4)
    return target, feats, cfg


def small(**kw):
    return TrainConfig(**{"epochs": 4, "lr": 3e-3, "anchors_per_sequence": 8, "sequences_per_step": 4,
                          "checkpoint_every": 1000, **kw})


def test_training_beats_the_untrained_drafter_on_held_out_sequences(setup, tmp_path):
    target, feats, cfg = setup
    before = evaluate(train_drafter(target, feats[4:], cfg, small(epochs=1, lr=0.0), tmp_path / "zero",
                                    progress=False), feats[:4])
    after = evaluate(train_drafter(target, feats[4:], cfg, small(), tmp_path / "a", progress=False), feats[:4])
    assert after[0] > before[0] + 0.1 and sum(after) > sum(before)
    assert (tmp_path / "a" / "drafter" / "config.json").exists()


def test_same_seed_same_weights_and_resume_equals_one_run(setup, tmp_path, monkeypatch):
    target, feats, cfg = setup
    one = train_drafter(target, feats, cfg, small(checkpoint_every=3), tmp_path / "one", progress=False)
    two = train_drafter(target, feats, cfg, small(checkpoint_every=3), tmp_path / "two", progress=False)
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    # a run killed after step 7 (last checkpoint at step 6) and resumed ends with the same weights
    import jetspec_compile.training.train as train_mod

    calls = {"n": 0}
    real_clip = torch.nn.utils.clip_grad_norm_

    def dying_clip(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(train_mod.torch.nn.utils, "clip_grad_norm_", dying_clip)
    with pytest.raises(KeyboardInterrupt):
        train_drafter(target, feats, cfg, small(checkpoint_every=3), tmp_path / "three", progress=False)
    monkeypatch.undo()
    assert torch.load(tmp_path / "three" / "train_state.pt", weights_only=False)["step"] == 6
    resumed = train_drafter(target, feats, cfg, small(checkpoint_every=3), tmp_path / "three", progress=False)
    for (name, a), b in zip(one.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(ValueError, match="other settings"):
        train_drafter(target, feats, cfg, small(checkpoint_every=3, lr=1e-3), tmp_path / "three", progress=False)


def test_reveal_training_and_continuing_from_a_checkpoint(setup, tmp_path):
    target, feats, cfg = setup
    first = train_drafter(target, feats, cfg, small(reveal_prob=0.5), tmp_path / "r", progress=False)
    more = train_drafter(target, feats, cfg, small(epochs=1, lr=0.0), tmp_path / "r2", progress=False,
                         init_checkpoint=tmp_path / "r" / "drafter")
    saved = load_drafter(tmp_path / "r" / "drafter", target)
    for a, b in zip(saved.state_dict().values(), more.state_dict().values()):
        torch.testing.assert_close(a, b)  # lr 0: continuing keeps the checkpoint's weights
    assert first is not None
    for other in (dataclasses.replace(cfg, block_size=3), dataclasses.replace(cfg, num_layers=0)):
        with pytest.raises(ValueError, match="continue with the same"):
            train_drafter(target, feats, other, small(), tmp_path / "r3", progress=False,
                          init_checkpoint=tmp_path / "r" / "drafter")
    assert not (tmp_path / "r3" / "drafter").exists()


def test_growing_a_trained_drafter_keeps_what_it_computes_then_trains_the_new_layer(setup, tmp_path):
    """``--init-from D --layers N``: appended layers start as identities (zeroed residual outputs), so the grown
    drafter drafts exactly what D drafts; training then moves them."""
    target, feats, cfg = setup
    train_drafter(target, feats[4:], cfg, small(), tmp_path / "one", progress=False)
    start = load_drafter(tmp_path / "one" / "drafter", target)
    grown = grow_layers(start, 2)
    assert grown.cfg.num_layers == 2 and len(grown.layers) == 2
    ids, hidden, prompt_len = feats[0]
    anchors = torch.tensor([prompt_len, prompt_len + 3])
    s = cfg.block_size
    positions = (anchors[:, None] + torch.arange(s)[None]).reshape(1, -1)
    mask = block_mask(anchors, ids.shape[0], s)
    def logits(drafter):
        with torch.no_grad():
            ctx = drafter.context_kv(hidden[None].float(), torch.arange(ids.shape[0])[None])
            return drafter(ids[anchors][None], positions, ctx, mask)

    torch.testing.assert_close(logits(start), logits(grown))
    assert evaluate(grown, feats[:4]) == evaluate(start, feats[:4])
    with pytest.raises(ValueError, match="cannot grow"):
        grow_layers(grown, 1)
    two = dataclasses.replace(cfg, num_layers=2)
    trained = train_drafter(target, feats[4:], two, small(epochs=2), tmp_path / "two", progress=False,
                            init_checkpoint=tmp_path / "one" / "drafter")
    assert trained.cfg.num_layers == 2
    assert trained.layers[1].o_proj.weight.abs().sum() > 0 and trained.layers[1].down_proj.weight.abs().sum() > 0
    assert load_drafter(tmp_path / "two" / "drafter", target).cfg.num_layers == 2


def test_feature_cache_skips_the_target_and_never_serves_stale_features(setup, tmp_path, caplog):
    target, feats, _ = setup
    taps = (0, 1)  # no last-layer tap: features come from the body's forward (no LM head), which the hook counts
    records = _records(feats[:5])
    reference = compute_features(target, records, taps, progress=False)
    with torch.no_grad():  # the whole model's hidden states, linears unpacked
        states = target(input_ids=feats[0][0][None], output_hidden_states=True).hidden_states
    torch.testing.assert_close(reference[0][1].float(), torch.cat([states[1][0], states[2][0]], -1), atol=2e-3,
                               rtol=2e-3)  # fp16 storage
    calls = {"n": 0}
    hook = target.model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    try:
        first = compute_features(target, records, taps, progress=False, cache_dir=tmp_path)
        assert calls["n"] == 5
        again = compute_features(target, records, taps, progress=False, cache_dir=tmp_path)
        assert calls["n"] == 5  # every sequence came from the cache
        for (ids_a, h_a, p_a), (ids_b, h_b, p_b), (ids_c, h_c, p_c) in zip(first, again, reference):
            assert torch.equal(ids_a, ids_b) and p_a == p_b == p_c
            torch.testing.assert_close(h_a, h_b, rtol=0, atol=0)
            torch.testing.assert_close(h_a, h_c, rtol=0, atol=0)  # what computing without a cache gives
        # other taps, a torn entry: recomputed, not served
        compute_features(target, records[:1], (1,), progress=False, cache_dir=tmp_path)
        assert calls["n"] == 6
        (folder,) = [d for d in tmp_path.iterdir() if d.is_dir()]
        entries = sorted(folder.glob("*.pt"), key=lambda e: e.stat().st_mtime)
        entries[0].write_bytes(entries[0].read_bytes()[:100])
        with caplog.at_level("WARNING"):
            repaired = compute_features(target, records, taps, progress=False, cache_dir=tmp_path)
        assert calls["n"] == 7 and "unreadable" in caplog.text
        for (_, h_a, _), (_, h_b, _) in zip(first, repaired):
            torch.testing.assert_close(h_a, h_b, rtol=0, atol=0)
        assert not list(folder.glob(".*.tmp"))
    finally:
        hook.remove()
    # a last-layer tap goes through the verify graph; its features are cached the same way
    last = compute_features(target, records[:2], TAPS, progress=False, cache_dir=tmp_path)
    for (_, h_a, _), (_, h_b, _) in zip(last, feats[:2]):
        torch.testing.assert_close(h_a, h_b, rtol=0, atol=0)
    # other weights (same config): another fingerprint, so nothing is reused
    changed = make_model("llama")
    with torch.no_grad():
        changed.model.norm.weight.add_(0.5)
    assert model_fingerprint(changed) != model_fingerprint(target)
    assert model_fingerprint(make_model("llama")) == model_fingerprint(target)


def test_depth_weighting_gamma_reaches_the_loss(setup, tmp_path):
    """``gamma`` sets how much the deeper block positions weigh: the same seed and data with another gamma must
    give other weights (nothing else differs between the two runs)."""
    target, feats, cfg = setup
    near = train_drafter(target, feats, cfg, small(epochs=1, gamma=0.05), tmp_path / "near", progress=False)
    flat = train_drafter(target, feats, cfg, small(epochs=1, gamma=50.0), tmp_path / "flat", progress=False)
    same = train_drafter(target, feats, cfg, small(epochs=1, gamma=0.05), tmp_path / "same", progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(near.state_dict().values(), flat.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(near.state_dict().values(), same.state_dict().values()))


def _records(feats):
    return [{"prompt_ids": f[0][:f[2]].tolist(), "response_ids": f[0][f[2]:].tolist()} for f in feats]


@torch.no_grad()
def test_kl_teacher_runs_the_last_layers_on_the_taps_and_falls_back_where_they_differ(setup):
    """The KL loss's target distribution comes from the layers after the deepest tap, run on the cached features:
    the full forward's on a Llama (over the whole and a draft vocabulary); where calling the layers that way does
    not reproduce the model (Mistral's 8-token sliding window over a longer sequence) it comes from the full
    forward instead."""
    target, feats, _ = setup
    taps = (0, 1)  # layer 2 of 3 runs on the tap
    sample = compute_features(target, _records(feats[:1]), taps, progress=False)[0]
    ids, hidden, _ = sample
    rows = torch.arange(ids.shape[0])
    full = target(input_ids=ids[None]).logits[0].float()
    teacher = _Teacher(target, taps, None, sample)
    assert teacher.fast
    torch.testing.assert_close(teacher(ids, hidden, rows), full.log_softmax(-1), atol=1e-2, rtol=0)  # fp16 taps
    vocab = torch.arange(0, VOCAB, 3)
    torch.testing.assert_close(_Teacher(target, taps, vocab, sample)(ids, hidden, rows[::2]),
                               full[::2, vocab].log_softmax(-1), atol=1e-2, rtol=0)
    mistral = make_model("mistral")
    assert mistral.config.sliding_window < ids.shape[0]
    sample = compute_features(mistral, _records(feats[:1]), taps, progress=False)[0]
    teacher = _Teacher(mistral, taps, None, sample)
    assert not teacher.fast
    torch.testing.assert_close(teacher(ids, sample[1], rows),
                               mistral(input_ids=ids[None]).logits[0].float().log_softmax(-1), atol=1e-4, rtol=0)


def test_bad_training_input_is_refused(setup, tmp_path):
    target, feats, cfg = setup
    with pytest.raises(ValueError, match="at least 2 sequences"):
        train_drafter(target, feats[:1], cfg, small(), tmp_path / "x", progress=False)
    assert not (tmp_path / "x" / "drafter").exists()
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="mse")
    with pytest.raises(ValueError, match="reveal_prob"):
        TrainConfig(reveal_prob=1.5)
    with pytest.raises(ValueError, match="gamma"):
        TrainConfig(gamma=0.0)
    with pytest.raises(TypeError):
        TrainConfig(learning_rate=1.0)


def test_training_over_a_draft_vocabulary(setup, tmp_path):
    """The drafter trains over the tokens it will draft: head of V' rows, labels outside V' carry no loss, the
    saved drafter carries the vocabulary, and a resume with another vocabulary is refused."""
    target, feats, cfg = setup
    counts = torch.bincount(torch.cat([f[0] for f in feats]), minlength=VOCAB)
    vocab = counts.argsort(descending=True)[:VOCAB // 2].tolist()  # half the vocabulary: some labels fall outside
    before = evaluate(train_drafter(target, feats[4:], cfg, small(epochs=1, lr=0.0), tmp_path / "z", progress=False,
                                    draft_vocab=vocab), feats[:4])
    kl = train_drafter(target, feats[4:], cfg, small(loss="kl", epochs=2), tmp_path / "kl", progress=False,
                       draft_vocab=vocab)  # forward KL against the target renormalised over V'
    assert kl.draft_vocab.tolist() == vocab
    assert evaluate(kl, feats[:4])[0] > before[0] + 0.05  # it learns (a uniform teacher: no gain)
    trained = train_drafter(target, feats[4:], cfg, small(), tmp_path / "v", progress=False, draft_vocab=vocab)
    after = evaluate(trained, feats[:4])
    assert trained.draft_vocab.tolist() == vocab
    assert after[0] > before[0] + 0.1 and sum(after) > sum(before)
    saved = load_drafter(tmp_path / "v" / "drafter", target)
    assert saved.draft_vocab.tolist() == vocab
    # its logits span the draft vocabulary only
    ids, hidden, _ = feats[0]
    logits = trained(ids[:2][None], torch.arange(2 * cfg.block_size)[None] % cfg.block_size,
                     trained.context_kv(hidden[None].float(), torch.arange(ids.shape[0])[None]),
                     torch.zeros(1, 1, 2 * cfg.block_size, ids.shape[0] + 2 * cfg.block_size),
                     head=trained.head_rows())
    assert logits.shape[-1] == len(vocab)
    with pytest.raises(ValueError, match="other settings"):
        train_drafter(target, feats[4:], cfg, small(), tmp_path / "v", progress=False, draft_vocab=vocab[:-1])


def test_a_sequence_with_no_label_in_the_draft_vocabulary_is_skipped_not_nan(setup, tmp_path):
    """A response made entirely of tokens outside the draft vocabulary (e.g. in another script) gives no loss
    term: it must not divide zero by zero and turn every weight into NaN."""
    target, feats, cfg = setup
    outside = set(feats[0][0][feats[0][2]:].tolist())  # every response token of sequence 0
    vocab = [t for t in range(VOCAB) if t not in outside]
    assert any(set(f[0][f[2]:].tolist()) - outside for f in feats[1:]), "the others must keep some labels"
    trained = train_drafter(target, [feats[0]] * 4 + feats[1:8], cfg, small(epochs=2), tmp_path / "oov",
                            progress=False, draft_vocab=vocab)
    assert all(torch.isfinite(p).all() for p in trained.parameters())
