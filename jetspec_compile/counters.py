"""Process-wide event counters, in one place (like ``torch._dynamo.utils.counters``).

``counters["inductor"]``: ``compiles``, ``frozen_compiles``, ``tree_attention_ops`` (attention ops that reached
Inductor in the last compile), ``onednn_linears``; ``counters["aoti"]``: ``compiled``, ``loaded`` packages.
Tests and benchmarks read them; ``counters[group].clear()`` resets a group.
"""

from __future__ import annotations

from collections import Counter, defaultdict

__all__ = ["counters"]

counters: defaultdict[str, Counter] = defaultdict(Counter)
