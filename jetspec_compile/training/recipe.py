"""The drafter training recipe: prompts → self-distilled responses → target features → trained drafter + corpus.

:class:`Recipe` holds every choice of ``jetspec-compile train-drafter`` with its default (the CLI reads its
defaults from here, so the command and the library train the same drafter); :func:`train_from_prompts` runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..capture import text_config
from ..drafter import CorpusIndex, ParallelDrafter, load_corpus, load_drafter, save_drafter
from ..drafter.model import DrafterConfig
from ..drafter.vocab import frequent_tokens
from ..passes import default_tap_layers
from ..paths import cache_dir
from ..prompts import PROMPT_SETS, load_jsonl, load_prompts
from .data import MAX_PROMPT_TOKENS, read_sequences, regenerate
from .train import TrainConfig, compute_features, evaluate, train_drafter

__all__ = ["Recipe", "train_from_prompts", "draft_vocab_of", "continued_shape", "held_out_split",
           "response_engine", "GENERATORS"]

#: what can regenerate the self-distillation responses (``Recipe.generator``)
GENERATORS = ("hf", "vllm")


@dataclass(frozen=True)
class Recipe:
    """Everything ``train-drafter`` decides. Unknown names raise (a frozen dataclass).

    Attributes:
        prompts: prompt sets (``humaneval``, ``gsm``, ``codeio``, ``pyfunc``, …; their train splits) and/or
            ``.jsonl`` files; ``limit`` prompts per set.
        data: the self-distillation JSONL (resumable; default: per model under the cache folder).
        response_tokens, gen_batch: length of each regenerated response, prompts per ``generate`` batch.
        generator: what regenerates the responses: ``"hf"`` (the model's own ``generate``) or ``"vllm"`` (the
            vLLM peer of ``make peers`` serving the model's folder, ``gen_batch`` concurrent requests; several
            times faster on a CPU, same greedy tokens).
        samples, sample_sets, sample_temperature: also draw ``samples`` sampled responses per prompt of those
            sets (all when None) at that temperature: more of the target's own text where a set is small.
        layers, block_size, tap_layers: the drafter's shape (taps default to 5 spread layers).
        train: the optimisation (:class:`~jetspec_compile.training.train.TrainConfig`).
        feature_cache: folder of cached target features (None: ``<cache>/features``); ``use_feature_cache``.
        draft_vocab: draft over the N most frequent response tokens (0: the whole vocabulary).
        init_from: continue from (and with more ``layers``, grow) this drafter checkpoint. The drafter keeps the
            checkpoint's shape (taps, block, style, mask token; a recipe asking for another is refused) and
            trains on the new data only.
        keep_vocab: with ``init_from``, draft over the checkpoint's draft vocabulary (``draft_vocab`` is then
            unused); False computes a new one from this data.
        merge_corpus: with ``init_from``, the saved corpus is the checkpoint's plus the new responses not already
            in it; False keeps the new responses only.
        resume: continue a training state found in the output folder.
        style, causal, mask_token_id: the drafter shape (:class:`~jetspec_compile.drafter.model.DrafterConfig`);
            ``"dflash"`` (the default, and the shipped drafter's) is the one serving engines run
            (``jetspec-compile export-vllm``); its mask token defaults to the highest id that never occurs in
            the data. ``"jetspec"`` drafts the next position from every block slot.
    """

    prompts: tuple[str, ...] = ("humaneval", "pyfunc", "gsm", "codeio")
    limit: int = 300
    data: str | None = None
    response_tokens: int = 160
    gen_batch: int = 16
    generator: str = "hf"
    samples: int = 0
    sample_sets: tuple[str, ...] | None = None
    sample_temperature: float = 0.7
    layers: int = 2
    block_size: int = 8
    tap_layers: tuple[int, ...] | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    feature_cache: str | None = None
    use_feature_cache: bool = True
    draft_vocab: int = 4096
    init_from: str | None = None
    keep_vocab: bool = True
    merge_corpus: bool = True
    resume: bool = True
    style: str = "dflash"
    causal: bool = True
    mask_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {self.generator!r}")
        if self.gen_batch < 1:
            raise ValueError(f"gen_batch must be >= 1, got {self.gen_batch}")
        unknown = set(self.sample_sets or ()) - set(self.prompts)
        if unknown:
            raise ValueError(f"sample_sets {sorted(unknown)} are not among prompts {list(self.prompts)}; name sets "
                             "that are also in prompts")
        if not self.prompts:
            raise ValueError(f"no training prompts: name prompt sets ({' '.join(PROMPT_SETS)}) or .jsonl files")
        if self.style != "dflash" and (not self.causal or self.mask_token_id is not None):
            raise ValueError("a bidirectional block and a mask token id belong to the 'dflash' style")

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)


def draft_vocab_of(records: list[dict], size: int, tokenizer=None) -> list[int]:
    """The ``size`` most frequent tokens of the target's responses (and its EOS, always)."""
    eos = [tokenizer.eos_token_id] if tokenizer is not None and tokenizer.eos_token_id is not None else []
    return frequent_tokens(records, size, always=eos)


def held_out_split(items: list, seed: int, share: int = 20) -> tuple[list, list]:
    """``(train, held_out)``: a seeded draw of one in ``share`` items (at least one) is held out, the rest trains.
    A draw, not the head of the list: the data file is ordered by set and prompt length, so its head is one set."""
    order = random.Random(seed).sample(range(len(items)), len(items))
    n = max(1, len(items) // share)
    return [items[i] for i in sorted(order[n:])], [items[i] for i in sorted(order[:n])]


def continued_shape(start: DrafterConfig, recipe: Recipe) -> DrafterConfig:
    """The shape of a drafter that continues one of shape ``start`` (``recipe.init_from``): the same taps, block,
    style and mask token, with ``max(recipe.layers, start.num_layers)`` layers (more grows it). A recipe that names
    another shape is refused: weights trained for one shape do not carry over to another."""
    asked = {"block_size": (recipe.block_size, start.block_size), "style": (recipe.style, start.style)}
    if recipe.tap_layers:
        asked["tap_layers"] = (tuple(recipe.tap_layers), tuple(start.tap_layers))
    if start.style == "dflash":
        asked["causal"] = (recipe.causal, start.causal)
        if recipe.mask_token_id is not None:
            asked["mask_token_id"] = (recipe.mask_token_id, start.mask_token_id)
    differ = {name: pair for name, pair in asked.items() if pair[0] != pair[1]}
    if differ:
        raise ValueError(
            f"init_from {recipe.init_from} is a drafter with "
            + ", ".join(f"{name}={theirs!r}" for name, (_, theirs) in differ.items()) + "; this recipe asks for "
            + ", ".join(f"{name}={mine!r}" for name, (mine, _) in differ.items())
            + ": continue with the checkpoint's shape (--style/--block-size/--tap-layers/--bidirectional/"
              "--mask-token-id as it has them) or train from scratch without --init-from")
    return dataclasses.replace(start, num_layers=max(recipe.layers, start.num_layers), draft_vocab_size=0)


@contextlib.contextmanager
def response_engine(model, recipe: Recipe, *, max_tokens: int, python=None, log=None):
    """What :func:`~jetspec_compile.training.data.regenerate` generates with: None (the model itself) for
    ``generator="hf"``; for ``"vllm"`` a :class:`~jetspec_compile.peers.VLLMPeer` serving the folder ``model``
    was loaded from (same dtype, this process's thread count, ``gen_batch`` concurrent requests of up to
    ``max_tokens`` tokens, a KV cache sized for all of them), started by its first ``generate`` call and closed
    on exit so that it holds no cores or memory afterwards."""
    if recipe.generator == "hf":
        yield None
        return
    import torch

    from ..peers import PeerConfig, VLLMPeer

    folder = Path(str(getattr(model, "name_or_path", "") or ""))
    if not (folder / "config.json").is_file():
        raise ValueError(f"generator 'vllm' serves the model from its checkpoint folder, and this model was not "
                         f"loaded from one (name_or_path {str(folder)!r}); load it with from_pretrained(<folder>) "
                         "or regenerate with generator 'hf'")
    c = text_config(model)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    per_token = 2 * c.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize
    gib = max(1, math.ceil(1.25 * per_token * max_tokens * recipe.gen_batch / 2**30))  # every request at once
    cfg = PeerConfig(model=str(folder), dtype=str(model.dtype).removeprefix("torch."), max_model_len=max_tokens,
                     max_num_seqs=recipe.gen_batch, kv_cache_gib=gib, threads=torch.get_num_threads())
    engine = _StartedOnUse(lambda: VLLMPeer(cfg, python=python, log=log))
    try:
        yield engine
    finally:
        engine.close()


class _StartedOnUse:
    """A peer started by its first ``generate`` call: a resumed run with nothing left to regenerate never waits
    for an engine to start."""

    def __init__(self, start):
        self._start, self.peer = start, None

    def generate(self, *args, **kwargs):
        if self.peer is None:
            self.peer = self._start()
        return self.peer.generate(*args, **kwargs)

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()


def train_from_prompts(model, tokenizer, recipe: Recipe, out: str | Path, *, data_path: str | Path,
                       progress: bool = True, peer_python=None) -> tuple[ParallelDrafter, CorpusIndex]:
    """Run ``recipe`` on ``model``: regenerate responses into ``data_path`` (resumable), compute features, train,
    and save ``out/drafter`` with its corpus. Returns the drafter and the corpus. ``peer_python``: the vLLM
    environment's Python for ``generator="vllm"`` (default: as ``bench --peers`` finds it)."""
    out = Path(out)
    prompts = []
    for name in recipe.prompts:
        items = load_jsonl(name, recipe.limit) if name.endswith(".jsonl") else load_prompts(name, "train", recipe.limit)
        prompts += [(name, p) for p in items]
    if not prompts:
        raise ValueError(f"the prompt sets {list(recipe.prompts)} gave no training prompts")
    start = load_drafter(recipe.init_from, model) if recipe.init_from else None
    if start is not None:  # refused before any regeneration
        dcfg = continued_shape(start.cfg, recipe)
    out.mkdir(parents=True, exist_ok=True)
    with response_engine(model, recipe, max_tokens=MAX_PROMPT_TOKENS + recipe.response_tokens, python=peer_python,
                         log=out / "vllm_regenerate.log") as engine:
        regenerate(model, tokenizer, prompts, data_path, max_new_tokens=recipe.response_tokens,
                   batch_size=recipe.gen_batch, max_prompt_tokens=MAX_PROMPT_TOKENS, engine=engine)
        if recipe.samples:
            sampled = [(name, p) for name, p in prompts if recipe.sample_sets is None or name in recipe.sample_sets]
            regenerate(model, tokenizer, sampled, data_path, max_new_tokens=recipe.response_tokens,
                       batch_size=recipe.gen_batch, max_prompt_tokens=MAX_PROMPT_TOKENS, samples=recipe.samples,
                       temperature=recipe.sample_temperature, seed=recipe.train.seed, engine=engine)
    records = read_sequences(data_path)
    taps = dcfg.tap_layers if start is not None else (recipe.tap_layers
                                                     or default_tap_layers(model.config.num_hidden_layers))
    features_dir = Path(recipe.feature_cache or cache_dir() / "features") if recipe.use_feature_cache else None
    feats = compute_features(model, records, taps, cache_dir=features_dir, progress=progress)
    train_feats, held_out = held_out_split(feats, recipe.train.seed)
    if start is None:
        shape = {}
        if recipe.style == "dflash":
            from ..drafter.dflash_format import unused_token
            mask = (recipe.mask_token_id if recipe.mask_token_id is not None
                    else unused_token(records, model.config.vocab_size))
            shape = dict(style="dflash", causal=recipe.causal, mask_token_id=mask)
        dcfg = DrafterConfig.for_target(model.config, taps, num_layers=recipe.layers, block_size=recipe.block_size,
                                        **shape)
    if start is not None and recipe.keep_vocab:
        vocab = None if start.draft_vocab is None else start.draft_vocab.tolist()
    else:
        vocab = draft_vocab_of(records, recipe.draft_vocab, tokenizer) if recipe.draft_vocab else None
    drafter = train_drafter(model, train_feats, dcfg, recipe.train, out, resume=recipe.resume,
                            eval_features=held_out, init_checkpoint=recipe.init_from, draft_vocab=vocab,
                            progress=progress)
    if progress:
        print(f"held-out accuracy per depth: {evaluate(drafter, held_out)}")
    corpus = CorpusIndex.from_records(records)
    earlier = load_corpus(recipe.init_from, model) if start is not None and recipe.merge_corpus else None
    if earlier is not None:
        corpus = earlier.merged(corpus.sequences())
        if progress:
            print(f"corpus: {len(earlier.sequences())} sequences of {recipe.init_from} plus the new responses "
                  f"-> {len(corpus.sequences())}")
    save_drafter(drafter, out / "drafter", corpus=corpus)
    return drafter, corpus
