"""The ``jetspec-compile`` command line: train a drafter, check losslessness, benchmark.

    jetspec-compile train-drafter --model smollm2 --out drafters/smollm2
    jetspec-compile draft-vocab --drafter drafters/smollm2/drafter --size 4096
    jetspec-compile build-corpus --drafter drafters/smollm2/drafter --data more_responses.jsonl
    jetspec-compile check --model smollm2 --drafter drafters/smollm2
    jetspec-compile bench --model smollm2 --drafter drafters/smollm2 --prompts humaneval gsm
    jetspec-compile export-trt --model smollm2 --drafter smollm2 --out engines/
    jetspec-compile export-vllm smollm2 vllm-drafter/
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from . import check_lossless, optimize
from .backends.onnx import check_tensorrt_ops, export_onnx
from .backends.tensorrt import export_tensorrt
from .bench import add_bench_arguments, run_bench_cli
from .capture import text_config
from .drafter import CorpusIndex, drafter_folder, load_corpus, load_drafter, load_jetspec_drafter, save_drafter
from .drafter.corpus import CORPUS_FILE
from .errors import JetSpecError
from .peers import PeerUnavailable
from .prompts import PROMPT_SETS, encode_chat, load_prompts
from .targets import load_target, selfdistill_path
from .training.data import read_sequences
from .training.recipe import GENERATORS, Recipe, draft_vocab_of, train_from_prompts
from .training.train import TrainConfig


def cmd_train(args) -> None:
    try:
        train = TrainConfig(epochs=args.epochs, lr=args.lr, anchors_per_sequence=args.anchors, seed=args.seed,
                            sequences_per_step=args.sequences_per_step, loss=args.loss, reveal_prob=args.reveal_prob,
                            gamma=args.gamma)
    except ValueError as err:  # a bad option value: say which, without a traceback, before anything loads
        raise SystemExit(f"train-drafter: {err}") from None
    unknown = set(args.sample_sets or ()) - set(args.prompts)
    if unknown:  # before anything loads or regenerates
        raise SystemExit(f"--sample-sets {sorted(unknown)} not among --prompts {args.prompts}; name sets that are "
                         "also in --prompts")
    try:
        recipe = Recipe(prompts=tuple(args.prompts), limit=args.limit, data=args.data,
                        response_tokens=args.response_tokens, gen_batch=args.gen_batch, generator=args.generator,
                        samples=args.samples,
                        sample_sets=tuple(args.sample_sets) if args.sample_sets else None,
                        sample_temperature=args.temperature, layers=args.layers, block_size=args.block_size,
                        tap_layers=tuple(args.tap_layers) if args.tap_layers else None, train=train,
                        feature_cache=args.feature_cache, use_feature_cache=not args.no_feature_cache,
                        draft_vocab=args.draft_vocab, resume=not args.restart,
                        init_from=str(drafter_folder(args.init_from)) if args.init_from else None,
                        keep_vocab=not args.new_vocab, merge_corpus=not args.replace_corpus,
                        style=args.style, causal=not args.bidirectional, mask_token_id=args.mask_token_id)
    except ValueError as err:
        raise SystemExit(f"train-drafter: {err}") from err
    torch.set_num_threads(args.threads)
    model, tok = load_target(args.model)
    out = Path(args.out)
    try:
        drafter, corpus = train_from_prompts(model, tok, recipe, out, data_path=selfdistill_path(args.model, args.data),
                                             peer_python=args.peer_python)
    except PeerUnavailable as err:
        raise SystemExit(f"train-drafter --generator vllm: {err}") from err
    print(f"saved {out / 'drafter'} (draft vocabulary: {drafter.cfg.draft_vocab_size or 'all'} tokens; corpus of "
          f"{len(corpus)} response tokens)")


def _with_draft_vocab(drafter, records, size: int, tok):
    return drafter.restrict_vocab(draft_vocab_of(records, size, tok))


def cmd_draft_vocab(args) -> None:
    model, tok = load_target(args.model)
    path = drafter_folder(args.drafter)
    data = selfdistill_path(args.model, args.data)
    records = read_sequences(data)
    if not records and args.size:
        raise SystemExit(f"no self-distillation data at {data}: run `jetspec-compile train-drafter` first or "
                         "pass --data")
    drafter = load_drafter(path, model).restrict_vocab(None)
    if args.size:
        drafter = _with_draft_vocab(drafter, records, args.size, tok)
    out = Path(args.out) if args.out else path
    save_drafter(drafter, out, corpus=load_corpus(path, model))  # the corpus travels with the drafter
    print(f"saved {out} (draft vocabulary: {drafter.cfg.draft_vocab_size or 'all'} tokens)")


def cmd_build_corpus(args) -> None:
    model, _ = load_target(args.model)
    folder = drafter_folder(args.drafter)
    load_drafter(folder, model)  # a drafter checkpoint for this target, or a clear error
    files = [Path(p) for p in args.data] if args.data else [selfdistill_path(args.model, args.data)]
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise SystemExit(f"--data: no such file {missing}; regenerate responses with `jetspec-compile train-drafter`")
    records = [r for p in files for r in read_sequences(p)]
    if not records:
        raise SystemExit(f"no responses in {[str(p) for p in files]}: the corpus needs the target's own responses "
                         "(JSONL lines with prompt_ids and response_ids)")
    vocab = text_config(model).vocab_size
    top = max(max(r["response_ids"] + r["prompt_ids"]) for r in records)
    if top >= vocab:
        raise SystemExit(f"token id {top} in --data is outside this model's vocabulary of {vocab}: the data was "
                         "regenerated with another model")
    corpus = CorpusIndex.from_records(records)
    kept = 0
    if args.append and (folder / CORPUS_FILE).exists():
        corpus, kept = _appended(CorpusIndex.load(folder / CORPUS_FILE, vocab_size=vocab), corpus)
    corpus.save(folder / CORPUS_FILE)
    print(f"saved {folder / CORPUS_FILE}: {len(corpus)} response tokens from {len(records)} new sequences"
          + (f" and {kept} kept" if args.append else ""))


def _appended(old, new):
    """A corpus of ``old``'s sequences followed by ``new``'s (and how many were kept from ``old``)."""
    def sequences(corpus):
        parts = np.split(corpus.tokens, np.flatnonzero(corpus.tokens < 0) + 1)
        return [p[p >= 0] for p in parts if (p >= 0).any()]

    kept = sequences(old)
    return CorpusIndex(kept + sequences(new)), len(kept)


def cmd_check(args) -> None:
    torch.set_num_threads(args.threads)
    model, tok = load_target(args.model)
    drafter = _drafter(args, model)
    spec = optimize(model, drafter=drafter, budget=args.budget)
    prompts = [encode_chat(tok, p) for p in load_prompts(args.prompts, "test", args.limit)]
    report = check_lossless(spec, prompts, max_new_tokens=args.max_new_tokens)
    print(report)
    sys.exit(0 if report.ok else 1)


def _drafter(args, model):
    if not getattr(args, "drafter", None):
        return None
    return load_jetspec_drafter(args.drafter, model, width=args.width)


def cmd_export(args) -> None:
    torch.set_num_threads(args.threads)
    model, _ = load_target(args.model)
    taps = _drafter(args, model).tap_layers if args.drafter else None
    out = Path(args.out)
    if args.command == "export-aoti":
        spec = optimize(model, drafter=_drafter(args, model), backend="aoti", artifact_dir=str(out),
                        budget=args.budget, max_cache_len=args.max_cache_len)
        sizes = spec.verifier(1).prepare()
        print(f"compiled verify graphs of {sizes} nodes into {out}")
        return
    if args.command == "export-onnx":
        path = export_onnx(model, out / "verify.onnx", budget=args.budget, tap_layers=taps)
        missing = check_tensorrt_ops(path)
        print(f"wrote {path}; TensorRT-supported ops only: {not missing}{'' if not missing else ' ' + str(missing)}")
        return
    try:
        paths = export_tensorrt(model, out, budget=args.budget, tap_layers=taps, max_cache_len=args.max_cache_len,
                                precision="fp32" if args.fp32 else "bf16" if args.bf16 else "fp16")
    except JetSpecError as err:
        raise SystemExit(f"export-trt: {err}") from err
    print("wrote", *paths.values())


def cmd_export_vllm(args) -> None:
    from .capture import text_config
    from .drafter import drafter_folder, load_drafter
    from .drafter.dflash_format import export_dflash, export_problem

    model, _ = load_target(args.model)
    drafter = load_drafter(drafter_folder(args.drafter), model)
    problem = export_problem(drafter.cfg, args.layout)
    if problem:
        raise SystemExit(f"{args.drafter}: {problem}")
    tc = text_config(model)
    out = export_dflash(drafter, args.out, args.layout, verifier=args.model,
                        max_position_embeddings=getattr(tc, "max_position_embeddings", 8192))
    k = drafter.cfg.depth
    print(f"wrote {out} ({args.layout} DFlash layout, {k} draft tokens per block). Serve it with vLLM:\n"
          f"  LLM(model=TARGET, speculative_config={{'method': 'dflash', 'model': '{out}', "
          f"'num_speculative_tokens': {k}}})")


def cmd_bench(args) -> None:
    run_bench_cli(args)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="jetspec-compile", description="Lossless speculative decoding with parallel "
                                 "tree drafting for Hugging Face causal LMs.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log each pass and step")
    sub = ap.add_subparsers(dest="command", required=True)

    RECIPE = Recipe()  # the training defaults live in the library
    tr = sub.add_parser("train-drafter", help="regenerate data with the target and train a parallel drafter")
    tr.add_argument("--model", default="smollm2", help="'smollm2' or a local HF checkpoint folder")
    tr.add_argument("--out", required=True, help="output folder (checkpoints, train state)")
    tr.add_argument("--prompts", nargs="+", default=list(RECIPE.prompts),
                    help=f"prompt sets ({' '.join(PROMPT_SETS)}) and/or .jsonl files")
    tr.add_argument("--limit", type=int, default=RECIPE.limit, help="prompts per set")
    tr.add_argument("--data", help="self-distillation JSONL (default: <cache>/data/<model name>_selfdistill.jsonl, "
                                   "shared by every run on that model)")
    tr.add_argument("--response-tokens", type=int, default=RECIPE.response_tokens)
    tr.add_argument("--gen-batch", type=int, default=RECIPE.gen_batch,
                    help="prompts per generate call (with --generator vllm: concurrent requests, e.g. 64)")
    tr.add_argument("--generator", choices=GENERATORS, default=RECIPE.generator,
                    help="what regenerates the responses: 'hf' (the model's generate) or 'vllm' (the vLLM CPU "
                         "peer of `make peers`, several times faster, same greedy tokens)")
    tr.add_argument("--peer-python", help="with --generator vllm: Python of the vLLM environment (default: "
                    "$JETSPEC_VLLM_PYTHON or .peers/vllm/bin/python)")
    tr.add_argument("--samples", type=int, default=RECIPE.samples,
                    help="also draw N sampled responses per prompt (more data where a prompt set is small)")
    tr.add_argument("--sample-sets", nargs="+", help="the --prompts entries to sample from (default: all)")
    tr.add_argument("--temperature", type=float, default=RECIPE.sample_temperature, help="temperature of --samples")
    tr.add_argument("--layers", type=int, default=RECIPE.layers)
    tr.add_argument("--block-size", type=int, default=RECIPE.block_size)
    tr.add_argument("--tap-layers", type=int, nargs="+")
    tr.add_argument("--epochs", type=int, default=RECIPE.train.epochs)
    tr.add_argument("--lr", type=float, default=RECIPE.train.lr)
    tr.add_argument("--anchors", type=int, default=RECIPE.train.anchors_per_sequence)
    tr.add_argument("--sequences-per-step", type=int, default=RECIPE.train.sequences_per_step)
    tr.add_argument("--loss", choices=["ce", "kl"], default=RECIPE.train.loss,
                    help="'ce': the target's own tokens; 'kl': the target's whole next-token distribution (its "
                         "layers after the deepest tap run on the cached features; for SmolLM2 a step costs "
                         "1.1-1.3x a 'ce' one)")
    tr.add_argument("--gamma", type=float, default=RECIPE.train.gamma,
                    help="loss weight of depth k is exp(-(k-1)/gamma): smaller puts more of it on the first depths")
    tr.add_argument("--reveal-prob", type=float, default=RECIPE.train.reveal_prob,
                    help="share of blocks trained with their first 1-2 path tokens given (path-conditioned trees)")
    tr.add_argument("--init-from", help="fine-tune this drafter checkpoint folder ('smollm2': the shipped one) on "
                    "the new data: its shape, draft vocabulary and corpus are kept, the new responses added to the "
                    "corpus; with a larger --layers its layers are kept and new ones appended, starting as identities")
    tr.add_argument("--new-vocab", action="store_true", help="with --init-from: compute a new draft vocabulary "
                    "(--draft-vocab) from this data instead of keeping the checkpoint's")
    tr.add_argument("--replace-corpus", action="store_true", help="with --init-from: save the new responses only as "
                    "the corpus instead of adding them to the checkpoint's")
    tr.add_argument("--feature-cache", help="folder of cached target features (default: <cache>/features); a rerun "
                    "on the same data skips the target forwards")
    tr.add_argument("--no-feature-cache", action="store_true", help="recompute features, write no cache")
    tr.add_argument("--draft-vocab", type=int, default=RECIPE.draft_vocab,
                    help="train and draft over the N most frequent tokens of the target's responses (0: all; see "
                         "draft-vocab); with --init-from the checkpoint's vocabulary is kept unless --new-vocab")
    tr.add_argument("--style", choices=["jetspec", "dflash"], default=RECIPE.style,
                    help="drafter shape: 'dflash' (default; the shipped drafter's) is the one vLLM and SGLang serve "
                         "(export-vllm); 'jetspec': every block slot predicts the next position")
    tr.add_argument("--bidirectional", action="store_true", help="--style dflash: attention inside a block sees the "
                    "whole block (DFlash's own choice) instead of a causal prefix")
    tr.add_argument("--mask-token-id", type=int, help="--style dflash: the token engines feed in MASK slots "
                    "(default: the highest id that never occurs in the training data)")
    tr.add_argument("--seed", type=int, default=RECIPE.train.seed)
    tr.add_argument("--threads", type=int, default=2)
    tr.add_argument("--restart", action="store_true", help="ignore an existing train state in --out")
    tr.set_defaults(func=cmd_train)

    dv = sub.add_parser("draft-vocab", help="set a drafter's draft vocabulary: the N most frequent tokens of the "
                        "target's self-distilled responses (a cheaper drafter head, same output)")
    dv.add_argument("--drafter", required=True, help="drafter checkpoint folder ('smollm2': the shipped one)")
    dv.add_argument("--size", type=int, required=True, help="tokens to keep (0: the whole vocabulary again)")
    dv.add_argument("--model", default="smollm2", help="the drafter's target")
    dv.add_argument("--data", help="self-distillation JSONL (default: <cache>/data/<model name>_selfdistill.jsonl)")
    dv.add_argument("--out", help="write here instead of replacing --drafter")
    dv.set_defaults(func=cmd_draft_vocab)

    bc = sub.add_parser("build-corpus", help="index the target's own responses (self-distillation JSONL files) into "
                        "a drafter folder: drafting then also continues the target's stock phrases")
    bc.add_argument("--drafter", required=True, help="drafter checkpoint folder ('smollm2': the shipped one)")
    bc.add_argument("--model", default="smollm2", help="the drafter's target")
    bc.add_argument("--data", nargs="+", help="self-distillation JSONL files, training prompts only (default: "
                                              "<cache>/data/<model name>_selfdistill.jsonl)")
    bc.add_argument("--append", action="store_true",
                    help="keep the sequences already in the drafter folder's corpus and add --data's after them")
    bc.set_defaults(func=cmd_build_corpus)

    ck = sub.add_parser("check", help="check that speculative greedy output equals plain greedy decoding")
    ck.add_argument("--model", default="smollm2")
    ck.add_argument("--drafter", help="drafter checkpoint folder (default: the training-free n-gram drafter)")
    ck.add_argument("--prompts", default="humaneval")
    ck.add_argument("--limit", type=int, default=5)
    ck.add_argument("--max-new-tokens", type=int, default=64)
    ck.add_argument("--budget", type=int, default=16)
    ck.add_argument("--width", type=int, default=4)
    ck.add_argument("--threads", type=int, default=2)
    ck.set_defaults(func=cmd_check)

    for name, helptext in (("export-onnx", "export the tree-verify step to ONNX"),
                           ("export-aoti", "compile the verify graphs into AOTInductor .pt2 packages (load with "
                                           "optimize(..., backend='aoti', artifact_dir=OUT))"),
                           ("export-trt", "export ONNX and build a TensorRT engine (needs tensorrt + GPU)")):
        ex = sub.add_parser(name, help=helptext)
        ex.add_argument("--model", default="smollm2")
        ex.add_argument("--drafter", help="drafter checkpoint (its tap layers are exported)")
        ex.add_argument("--out", required=True, help="output folder")
        ex.add_argument("--budget", type=int, default=16, help="tree budget N (static in the graph)")
        ex.add_argument("--max-cache-len", type=int, default=4096, help="largest cache length of the engine profile")
        ex.add_argument("--fp32", action="store_true", help="no FP16 flag")
        ex.add_argument("--bf16", action="store_true", help="set the BF16 flag")
        ex.add_argument("--width", type=int, default=4)
        ex.add_argument("--threads", type=int, default=2)
        ex.set_defaults(func=cmd_export)

    ev = sub.add_parser("export-vllm", help="write a --style dflash drafter as a DFlash checkpoint that vLLM "
                        "(speculative method 'dflash') and SGLang (DFLASH) load")
    ev.add_argument("drafter", help="drafter checkpoint folder")
    ev.add_argument("out", help="output folder")
    ev.add_argument("--model", default="smollm2", help="the drafter's target ('smollm2' or a local HF folder)")
    ev.add_argument("--layout", choices=["native", "speculators"], default="native",
                    help="'native': vLLM's DFlashDraftModel config; 'speculators': the speculators package's format "
                         "(bidirectional drafters only)")
    ev.set_defaults(func=cmd_export_vllm)

    be = sub.add_parser("bench", help="benchmark against HF generate and assisted generation, interleaved")
    add_bench_arguments(be)
    be.set_defaults(func=cmd_bench)

    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    args.func(args)


if __name__ == "__main__":
    main()
