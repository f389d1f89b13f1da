"""The ``jetspec-compile`` command line: train a drafter, check losslessness, benchmark.

    jetspec-compile train-drafter --model smollm2 --out drafters/smollm2
    jetspec-compile draft-vocab --drafter drafters/smollm2/drafter --size 4096
    jetspec-compile build-corpus --drafter drafters/smollm2/drafter --data more_responses.jsonl
    jetspec-compile check --model smollm2 --drafter drafters/smollm2
    jetspec-compile bench --model smollm2 --drafter drafters/smollm2 --prompts humaneval gsm
    jetspec-compile export-trt --model smollm2 --drafter smollm2 --out engines/
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def load_target(name: str):
    """``smollm2`` (the shipped real model) or a local Hugging Face checkpoint folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "smollm2":
        from .models import load_smollm2
        return load_smollm2()
    path = Path(name)
    if not path.exists():
        raise SystemExit(f"--model {name!r}: not 'smollm2' and no such folder (the hub is not used at run time)")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    return model, tok


def _data_path(args) -> Path:
    """``--data``, or the self-distillation file of ``--model``: the regenerated data belongs to the target, not
    to one training run, so it is keyed by the model's name."""
    from .models import cache_dir

    return Path(args.data) if args.data else cache_dir() / "data" / f"{Path(args.model).name}_selfdistill.jsonl"


def cmd_train(args) -> None:
    import torch

    from .drafter.data import read_sequences, regenerate
    from .drafter import CorpusIndex, save_drafter
    from .drafter.model import DrafterConfig
    from .drafter.train import TrainConfig, compute_features, evaluate, train_drafter
    from .models import cache_dir
    from .passes import default_tap_layers
    from .prompts import load_jsonl, load_prompts

    unknown = set(args.sample_sets or ()) - set(args.prompts)
    if unknown:  # before anything loads or regenerates
        raise SystemExit(f"--sample-sets {sorted(unknown)} not among --prompts {args.prompts}; name sets that are "
                         "also in --prompts")
    torch.set_num_threads(args.threads)
    model, tok = load_target(args.model)
    out = Path(args.out)
    data = _data_path(args)
    prompts = []
    for name in args.prompts:
        items = load_jsonl(name, args.limit) if name.endswith(".jsonl") else load_prompts(name, "train", args.limit)
        prompts += [(name, p) for p in items]
    if not prompts:
        raise SystemExit("no training prompts: pass --prompts humaneval pyfunc gsm codeio or a .jsonl file")
    regenerate(model, tok, prompts, data, max_new_tokens=args.response_tokens, batch_size=args.gen_batch)
    if args.samples:
        sampled = [(name, p) for name, p in prompts if args.sample_sets is None or name in args.sample_sets]
        regenerate(model, tok, sampled, data, max_new_tokens=args.response_tokens, batch_size=args.gen_batch,
                   samples=args.samples, temperature=args.temperature, seed=args.seed)
    records = read_sequences(data)
    taps = tuple(args.tap_layers) if args.tap_layers else default_tap_layers(model.config.num_hidden_layers)
    features_dir = None if args.no_feature_cache else Path(args.feature_cache or cache_dir() / "features")
    feats = compute_features(model, records, taps, cache_dir=features_dir)
    n_eval = max(1, len(feats) // 20)
    dcfg = DrafterConfig.for_target(model.config, taps, num_layers=args.layers, block_size=args.block_size)
    tcfg = TrainConfig(epochs=args.epochs, lr=args.lr, anchors_per_sequence=args.anchors, seed=args.seed,
                       sequences_per_step=args.sequences_per_step, loss=args.loss, reveal_prob=args.reveal_prob)
    vocab = _draft_vocab(records, args.draft_vocab, tok) if args.draft_vocab else None
    drafter = train_drafter(model, feats[n_eval:], dcfg, tcfg, out, resume=not args.restart,
                            eval_features=feats[:n_eval], init_checkpoint=args.init_from, draft_vocab=vocab)
    print(f"held-out accuracy per depth: {evaluate(drafter, feats[:n_eval])}")
    corpus = CorpusIndex.from_records(records)
    save_drafter(drafter, out / "drafter", corpus=corpus)
    print(f"saved {out / 'drafter'} (draft vocabulary: {drafter.cfg.draft_vocab_size or 'all'} tokens; corpus of "
          f"{len(corpus)} response tokens)")


def _draft_vocab(records, size: int, tok) -> list[int]:
    from .drafter.vocab import frequent_tokens

    eos = [tok.eos_token_id] if tok is not None and tok.eos_token_id is not None else []
    return frequent_tokens(records, size, always=eos)


def _with_draft_vocab(drafter, records, size: int, tok):
    return drafter.restrict_vocab(_draft_vocab(records, size, tok))


def cmd_draft_vocab(args) -> None:
    from .drafter import drafter_folder, load_corpus, load_drafter, save_drafter
    from .drafter.data import read_sequences

    model, tok = load_target(args.model)
    path = drafter_folder(args.drafter)
    data = _data_path(args)
    records = read_sequences(data)
    if not records and args.size:
        raise SystemExit(f"no self-distillation data at {data}: run `jetspec-compile train-drafter` first or pass --data")
    drafter = load_drafter(path, model).restrict_vocab(None)
    if args.size:
        drafter = _with_draft_vocab(drafter, records, args.size, tok)
    out = Path(args.out) if args.out else path
    save_drafter(drafter, out, corpus=load_corpus(path, model))  # the corpus travels with the drafter
    print(f"saved {out} (draft vocabulary: {drafter.cfg.draft_vocab_size or 'all'} tokens)")


def cmd_build_corpus(args) -> None:
    from .capture import text_config
    from .drafter import CorpusIndex, drafter_folder, load_drafter
    from .drafter.corpus import CORPUS_FILE
    from .drafter.data import read_sequences

    model, _ = load_target(args.model)
    folder = drafter_folder(args.drafter)
    load_drafter(folder, model)  # a drafter checkpoint for this target, or a clear error
    files = [Path(p) for p in args.data] if args.data else [_data_path(args)]
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
    corpus.save(folder / CORPUS_FILE)
    print(f"saved {folder / CORPUS_FILE}: {len(corpus)} response tokens from {len(records)} sequences")


def cmd_check(args) -> None:
    import torch

    from . import check_lossless, optimize
    from .prompts import encode_chat, load_prompts

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
    from .drafter import load_jetspec_drafter
    return load_jetspec_drafter(args.drafter, model, width=args.width)


def cmd_export(args) -> None:
    import torch

    from .backends.onnx import check_tensorrt_ops, export_onnx
    from .backends.tensorrt import export_tensorrt
    from .errors import JetSpecError

    torch.set_num_threads(args.threads)
    model, _ = load_target(args.model)
    taps = _drafter(args, model).tap_layers if args.drafter else None
    out = Path(args.out)
    if args.command == "export-aoti":
        from . import optimize
        spec = optimize(model, drafter=_drafter(args, model), backend="aoti", artifact_dir=str(out),
                        budget=args.budget, max_cache_len=args.max_cache_len)
        sizes = spec.verifier(1).prepare()
        print(f"compiled verify graphs of {sizes} nodes into {out}")
        return
    if args.command == "export-onnx":
        path = export_onnx(model, out / "verify.onnx", num_nodes=args.budget, tap_layers=taps)
        missing = check_tensorrt_ops(path)
        print(f"wrote {path}; TensorRT-supported ops only: {not missing}{'' if not missing else ' ' + str(missing)}")
        return
    try:
        paths = export_tensorrt(model, out, num_nodes=args.budget, tap_layers=taps, max_cache_len=args.max_cache_len,
                                fp16=not args.fp32, bf16=args.bf16)
    except JetSpecError as err:
        raise SystemExit(f"export-trt: {err}") from err
    print("wrote", *paths.values())


def cmd_bench(args) -> None:
    from .bench import run_bench_cli
    run_bench_cli(args)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="jetspec-compile", description="Lossless speculative decoding with parallel "
                                 "tree drafting for Hugging Face causal LMs.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log each pass and step")
    sub = ap.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train-drafter", help="regenerate data with the target and train a parallel drafter")
    tr.add_argument("--model", default="smollm2", help="'smollm2' or a local HF checkpoint folder")
    tr.add_argument("--out", required=True, help="output folder (checkpoints, train state)")
    tr.add_argument("--prompts", nargs="+", default=["humaneval", "pyfunc", "gsm", "codeio"],
                    help="prompt sets (humaneval gsm codeio pyfunc) and/or .jsonl files")
    tr.add_argument("--limit", type=int, default=300, help="prompts per set")
    tr.add_argument("--data", help="self-distillation JSONL (default: <cache>/data/<model name>_selfdistill.jsonl, "
                                   "shared by every run on that model)")
    tr.add_argument("--response-tokens", type=int, default=160)
    tr.add_argument("--gen-batch", type=int, default=16)
    tr.add_argument("--samples", type=int, default=0,
                    help="also draw N sampled responses per prompt (more data where a prompt set is small)")
    tr.add_argument("--sample-sets", nargs="+", help="the --prompts entries to sample from (default: all)")
    tr.add_argument("--temperature", type=float, default=0.7, help="temperature of --samples")
    tr.add_argument("--layers", type=int, default=2)
    tr.add_argument("--block-size", type=int, default=8)
    tr.add_argument("--tap-layers", type=int, nargs="+")
    tr.add_argument("--epochs", type=int, default=6)
    tr.add_argument("--lr", type=float, default=6e-4)
    tr.add_argument("--anchors", type=int, default=16)
    tr.add_argument("--sequences-per-step", type=int, default=4)
    tr.add_argument("--loss", choices=["ce", "kl"], default="ce")
    tr.add_argument("--reveal-prob", type=float, default=0.25,
                    help="share of blocks trained with their first 1-2 path tokens given (path-conditioned trees)")
    tr.add_argument("--init-from", help="continue from this drafter checkpoint folder on new data (same config; "
                    "with a larger --layers its layers are kept and new ones appended, starting as identities)")
    tr.add_argument("--feature-cache", help="folder of cached target features (default: <cache>/features); a rerun "
                    "on the same data skips the target forwards")
    tr.add_argument("--no-feature-cache", action="store_true", help="recompute features, write no cache")
    tr.add_argument("--draft-vocab", type=int, default=4096,
                    help="train and draft over the N most frequent tokens of the target's responses (0: all; see "
                         "draft-vocab)")
    tr.add_argument("--seed", type=int, default=0)
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

    from .bench import add_bench_arguments
    be = sub.add_parser("bench", help="benchmark against HF generate and assisted generation, interleaved")
    add_bench_arguments(be)
    be.set_defaults(func=cmd_bench)

    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    args.func(args)


if __name__ == "__main__":
    main()
