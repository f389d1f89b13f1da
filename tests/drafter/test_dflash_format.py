"""DFlash checkpoints: export → import keeps the drafts; foreign checkpoints written here from the format's
description draft what an independent plain-torch forward of that description drafts; bad input is refused."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import jetspec_compile as js
from jetspec_compile.drafter import DrafterConfig, JetSpecDrafter, ParallelDrafter, load_drafter
from jetspec_compile.drafter.dflash_format import dflash_layout, export_dflash
from tests.families import VOCAB, make_model

TAPS = (0, 2)
MASK_ID = VOCAB - 1


def dflash_drafter(target, causal=False, block=5, layers=2, seed=0):
    cfg = DrafterConfig.for_target(target.config, TAPS, num_layers=layers, block_size=block, style="dflash",
                                   causal=causal, mask_token_id=MASK_ID)
    net = ParallelDrafter(cfg, target.get_input_embeddings(), target.get_output_embeddings())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every tensor random, norms included, so a swapped or dropped weight shows
        for name, p in net.named_parameters():
            scale = 0.3 if p.dim() == 1 else 1.0 / p.shape[-1] ** 0.5
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + scale * torch.randn(p.shape, generator=g))
    return net.eval()


def context(target, length=14, seed=1):
    ids = torch.randint(3, VOCAB - 1, (length,), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        states = target(input_ids=ids[None], output_hidden_states=True).hidden_states
    return ids, torch.cat([states[i + 1][0] for i in TAPS], -1)  # taps: decoder layer outputs


def drafts(net, ids, hidden, root, budget=12, width=3):
    d = JetSpecDrafter(net, width=width, lookup_nodes=0, path_branches=1)
    d.begin([ids.tolist()], [hidden])
    logprobs = d.depth_logprobs(0, root)
    tree = d.draft([root], budget)[0]
    return logprobs, tree


@pytest.mark.parametrize("layout,causal,vocab", [("native", False, False), ("native", True, True),
                                                 ("speculators", False, True)])
def test_export_then_import_drafts_the_same(tmp_path, layout, causal, vocab):
    target = make_model("qwen3")
    net = dflash_drafter(target, causal=causal)
    if vocab:
        net = net.restrict_vocab(torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3))[:40].tolist())
    out = export_dflash(net, tmp_path / "d", layout)
    assert dflash_layout(out) == layout and not list(tmp_path.glob(".d-*"))
    config = json.loads((out / "config.json").read_text())
    if layout == "native":
        assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
        assert config["dflash_config"] == {"mask_token_id": MASK_ID, "target_layer_ids": list(TAPS)}
        assert config["is_causal"] is causal
    loaded = load_drafter(out, target)
    assert loaded.cfg.style == "dflash" and loaded.cfg.causal is causal and loaded.cfg.tap_layers == TAPS
    ids, hidden = context(target)
    expected, expected_tree = drafts(net, ids, hidden, root=7)
    actual, actual_tree = drafts(loaded, ids, hidden, root=7)
    if vocab:  # the export orders the draft vocabulary by token id: compare per token
        order = lambda n: n.draft_vocab.argsort()  # noqa: E731
        expected, actual = expected[:, order(net)], actual[:, order(loaded)]
    torch.testing.assert_close(actual, expected)
    assert actual_tree == expected_tree


def test_the_default_shape_and_inexpressible_drafters_are_refused(tmp_path):
    target = make_model("qwen3")
    cfg = DrafterConfig.for_target(target.config, TAPS, num_layers=1, block_size=4)
    plain = ParallelDrafter(cfg, target.get_input_embeddings(), target.get_output_embeddings())
    with pytest.raises(ValueError, match="'jetspec' shape.*--style dflash"):
        export_dflash(plain, tmp_path / "d")
    with pytest.raises(ValueError, match="bidirectional blocks only; export a causal"):
        export_dflash(dflash_drafter(target, causal=True), tmp_path / "d", "speculators")
    no_mask = DrafterConfig.for_target(target.config, TAPS, num_layers=1, block_size=4, style="dflash")
    with pytest.raises(ValueError, match="mask_token_id"):
        export_dflash(ParallelDrafter(no_mask, target.get_input_embeddings(), target.get_output_embeddings()),
                      tmp_path / "d")
    assert not (tmp_path / "d").exists()
    with pytest.raises(ValueError, match="needs causal"):
        DrafterConfig.for_target(target.config, TAPS, causal=False)


# ---- foreign checkpoints, written from the format description; reference forward in plain torch ----

def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _neox(x, pos, theta):
    """x [heads, n, d] rotated at positions pos [n]: halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    d = x.shape[-1]
    ang = pos[:, None].double() * theta ** (-torch.arange(0, d, 2).double() / d)  # [n, d/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()
    rot = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rot * sin


def reference_drafts(w, conf, embed, head, taps_hidden, bonus, k, causal):
    """Greedy DFlash drafts of the ``k`` MASK slots after ``bonus``, from the format description alone."""
    eps, hd, theta = conf["rms_norm_eps"], conf["head_dim"], conf["rope_theta"]
    nh, nkv = conf["num_attention_heads"], conf["num_key_value_heads"]
    t = taps_hidden.shape[0]
    ctx = _rms(taps_hidden @ w["fc.weight"].T, w["hidden_norm.weight"], eps)
    ctx_pos, blk_pos = torch.arange(t), torch.arange(t, t + k + 1)
    x = torch.cat([embed[bonus][None], w["_mask"][None].expand(k, -1)])  # [k+1, H]
    for i in range(conf["num_hidden_layers"]):
        p = lambda n: w[f"layers.{i}.{n}"]  # noqa: E731
        heads = lambda y, n: y.view(-1, n, hd).transpose(0, 1)  # noqa: E731
        ck = _neox(_rms(heads(ctx @ p("self_attn.k_proj.weight").T, nkv), p("self_attn.k_norm.weight"), eps), ctx_pos,
                   theta)
        cv = heads(ctx @ p("self_attn.v_proj.weight").T, nkv)
        h = _rms(x, p("input_layernorm.weight"), eps)
        q = _neox(_rms(heads(h @ p("self_attn.q_proj.weight").T, nh), p("self_attn.q_norm.weight"), eps), blk_pos,
                  theta)
        bk = _neox(_rms(heads(h @ p("self_attn.k_proj.weight").T, nkv), p("self_attn.k_norm.weight"), eps), blk_pos,
                   theta)
        bv = heads(h @ p("self_attn.v_proj.weight").T, nkv)
        kk = torch.cat([ck, bk], 1).repeat_interleave(nh // nkv, 0)
        vv = torch.cat([cv, bv], 1).repeat_interleave(nh // nkv, 0)
        scores = q @ kk.transpose(1, 2) / hd ** 0.5  # [nh, k+1, t+k+1]
        if causal:
            scores[:, :, t:] += torch.full((k + 1, k + 1), float("-inf")).triu(1)
        att = (scores.softmax(-1) @ vv).transpose(0, 1).reshape(k + 1, -1)
        x = x + att @ p("self_attn.o_proj.weight").T
        h = _rms(x, p("post_attention_layernorm.weight"), eps)
        gated = F.silu(h @ p("mlp.gate_proj.weight").T) * (h @ p("mlp.up_proj.weight").T)
        x = x + gated @ p("mlp.down_proj.weight").T
    logits = _rms(x, w["norm.weight"], eps)[1:] @ head.T  # the bonus slot's output is unused
    return logits.log_softmax(-1)  # [k, V']


def foreign_checkpoint(folder, target, layout, seed=0, draft_vocab=None):
    """A 2-layer DFlash checkpoint with random weights, written from the format description."""
    tc = target.config
    h, hd, nh, nkv, inter = tc.hidden_size, 8, 4, 2, 48
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) / s[-1] ** 0.5  # noqa: E731
    n = lambda s: 1 + 0.3 * torch.randn(s, generator=g)  # noqa: E731
    w = {"fc.weight": r(h, len(TAPS) * h), "hidden_norm.weight": n(h), "norm.weight": n(h)}
    for i in range(2):
        w.update({f"layers.{i}.input_layernorm.weight": n(h), f"layers.{i}.post_attention_layernorm.weight": n(h),
                  f"layers.{i}.self_attn.q_proj.weight": r(nh * hd, h),
                  f"layers.{i}.self_attn.k_proj.weight": r(nkv * hd, h),
                  f"layers.{i}.self_attn.v_proj.weight": r(nkv * hd, h),
                  f"layers.{i}.self_attn.o_proj.weight": r(h, nh * hd),
                  f"layers.{i}.self_attn.q_norm.weight": n(hd), f"layers.{i}.self_attn.k_norm.weight": n(hd),
                  f"layers.{i}.mlp.gate_proj.weight": r(inter, h), f"layers.{i}.mlp.up_proj.weight": r(inter, h),
                  f"layers.{i}.mlp.down_proj.weight": r(h, inter)})
    layer = {"model_type": "qwen3", "hidden_size": h, "num_hidden_layers": 2, "num_attention_heads": nh,
             "num_key_value_heads": nkv, "head_dim": hd, "intermediate_size": inter, "hidden_act": "silu",
             "rms_norm_eps": 1e-6, "rope_theta": 50000.0, "max_position_embeddings": 512, "vocab_size": VOCAB}
    files = dict(w)
    if draft_vocab is not None:
        files["d2t"] = draft_vocab - torch.arange(draft_vocab.numel())
        files["lm_head.weight"] = target.lm_head.weight.detach()[draft_vocab].clone()
    if layout == "native":
        config = {"architectures": ["DFlashDraftModel"], **layer, "block_size": 6,
                  "dflash_config": {"mask_token_id": MASK_ID, "target_layer_ids": list(TAPS)}}  # no is_causal
    else:
        config = {"speculators_model_type": "dflash", "architectures": ["DFlashSpeculator"],
                  "transformer_layer_config": layer, "block_size": 6, "mask_token_id": MASK_ID,
                  "aux_hidden_state_layer_ids": [i + 1 for i in TAPS],
                  "draft_vocab_size": VOCAB if draft_vocab is None else draft_vocab.numel()}
    folder.mkdir()
    save_file({f"model.{k}" if layout == "speculators" else k: v.contiguous() for k, v in files.items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    mask = 0.5 * torch.randn(h, generator=g)
    if layout == "native":  # a plain [H] tensor; the speculators one goes without (the mask token's own row)
        torch.save(mask, folder / "mask_embedding.pt")
        w["_mask"] = mask
    else:
        w["_mask"] = target.get_input_embeddings().weight.detach()[MASK_ID]
    return w, {**layer, "block_size": 6}


@pytest.mark.parametrize("layout", ["native", "speculators"])
def test_foreign_checkpoint_drafts_what_the_format_says(tmp_path, layout):
    target = make_model("qwen3")
    gen = torch.Generator().manual_seed(5)
    vocab = None if layout == "native" else torch.randperm(VOCAB, generator=gen)[:50].sort().values
    w, conf = foreign_checkpoint(tmp_path / "dflash", target, layout, draft_vocab=vocab)
    net = load_drafter(tmp_path / "dflash", target)
    assert net.cfg.style == "dflash" and net.cfg.causal is False and net.cfg.depth == 5
    ids, hidden = context(target, length=17)
    d = JetSpecDrafter(net, width=1, lookup_nodes=0)
    d.begin([ids[:-1].tolist()], [hidden[:-1]])
    head = target.lm_head.weight.detach() if vocab is None else target.lm_head.weight.detach()[vocab]
    with torch.no_grad():
        expected = reference_drafts(w, conf, target.get_input_embeddings().weight.detach(), head, hidden[:-1],
                                    int(ids[-1]), 5, causal=False)
        torch.testing.assert_close(d.depth_logprobs(0, int(ids[-1])), expected, atol=1e-4, rtol=1e-4)
        # the bonus token equal to the mask token embeds as the mask (what the engines do)
        expected = reference_drafts({**w}, conf, torch.where(torch.arange(VOCAB)[:, None] == MASK_ID, w["_mask"],
                                    target.get_input_embeddings().weight.detach()), head, hidden[:-1], MASK_ID, 5,
                                    causal=False)
        torch.testing.assert_close(d.depth_logprobs(0, MASK_ID), expected, atol=1e-4, rtol=1e-4)
    # and drives tree verification losslessly
    spec = js.attach_drafter(target, tmp_path / "dflash", budget=10, max_cache_len=128)
    prompt = ids[None, :9]
    ref = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    assert torch.equal(spec.generate(prompt, max_new_tokens=20), ref)


def test_foreign_checkpoints_with_what_we_do_not_run_are_refused(tmp_path):
    target = make_model("qwen3")
    foreign_checkpoint(tmp_path / "d", target, "native")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    for change, message in (({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
                            ({"layer_types": ["sliding_attention", "full_attention"]}, "sliding-window"),
                            ({"hidden_size": 32}, "32 wide"),
                            ({"dflash_config": {"mask_token_id": MASK_ID, "target_layer_ids": [0, 7]}},
                             "another target: taps"),
                            ({"vocab_size": VOCAB + 1}, "another target: vocabulary"),
                            ({"num_target_layers": 5}, "another target: made for a target of 5 layers")):
        (tmp_path / "d" / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            load_drafter(tmp_path / "d", target)
    (tmp_path / "d" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="missing.*layers.2"):
        load_drafter(tmp_path / "d", target)


def test_export_vllm_command(tmp_path, monkeypatch, capsys):
    from jetspec_compile import cli
    from jetspec_compile.drafter import save_drafter

    target = make_model("qwen3")
    monkeypatch.setattr(cli, "load_target", lambda name: (target, None))
    save_drafter(dflash_drafter(target), tmp_path / "ours")
    cli.main(["export-vllm", str(tmp_path / "ours"), str(tmp_path / "vllm")])
    assert dflash_layout(tmp_path / "vllm") == "native" and "num_speculative_tokens': 4" in capsys.readouterr().out
    cfg = DrafterConfig.for_target(target.config, TAPS, num_layers=1, block_size=4)
    save_drafter(ParallelDrafter(cfg, target.get_input_embeddings(), target.get_output_embeddings()), tmp_path / "js")
    with pytest.raises(SystemExit, match="'jetspec' shape"):
        cli.main(["export-vllm", str(tmp_path / "js"), str(tmp_path / "no")])
    assert not (tmp_path / "no").exists()
