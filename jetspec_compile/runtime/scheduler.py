"""Overlapping ``generate`` calls of one :class:`~jetspec_compile.runtime.spec_model.SpecModel`.

A speculative model owns state that one loop uses at a time: the verifier's static KV cache and the drafter's
per-row context. :class:`BatchScheduler` runs one loop at a time per model; calls that arrive while a loop runs
wait in a queue, and when it ends the oldest waiting call takes up to ``max_batch`` rows of waiting calls that
can share a loop (greedy, same ``max_new_tokens`` and EOS ids, left-padded) into one left-padded batch: the
runtime verifies a tree per row, and a greedy row's output does not depend on the other rows. Sampling calls
always run alone (a shared generator would be consumed in another order). Each call gets back its own rows;
its ``emit`` callback (its streamer) only ever sees its own rows' tokens.

No thread is started: the caller whose turn it is runs the loop in its own thread (leader/follower), so the
scheduler needs no shutdown and works from any thread pool.

:func:`shared_lock` guards what several models may share (a drafter object, the target module): their loops
take turns on it.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

__all__ = ["BatchScheduler", "Request", "shared_lock"]

_LOCKS: "weakref.WeakKeyDictionary[object, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()
#: for objects that cannot be weakly referenced or hashed: one lock for all of them (correct, more waiting)
_FALLBACK_LOCK = threading.RLock()


def shared_lock(obj) -> threading.RLock:
    """The process-wide lock of an object several models may share: a drafter (its per-row state) or a target
    module (capturing it for a new verifier graph swaps its parameters for a moment). Loops of different models
    hold it while they use the object, so they take turns on it instead of corrupting each other's state."""
    with _LOCKS_GUARD:
        try:
            lock = _LOCKS.get(obj)
            if lock is None:
                lock = _LOCKS[obj] = threading.RLock()
            return lock
        except TypeError:
            return _FALLBACK_LOCK


@dataclass(eq=False)
class Request:
    """One ``generate`` call waiting for, or running in, a loop.

    Args:
        input_ids / attention_mask: ``[b, P]`` (left-padded when ``b > 1``).
        key: requests with equal keys may share a loop; ``None``: this request runs alone.
        emit: ``emit(row, tokens)`` with ``row`` counted within this request (its streamer), or None.
    """

    input_ids: torch.Tensor  # [b, P]
    attention_mask: torch.Tensor  # [b, P]
    key: Hashable | None
    emit: Callable[[int, list[int]], None] | None = None
    outputs: list[list[int]] | None = None  # [b] new tokens per row
    stats: object = None  # the loop's LoopStats
    error: BaseException | None = None
    finished: bool = False

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class _Batch:
    """Requests merged into one left-padded batch; ``offsets[i]`` is request i's first row."""

    requests: list[Request]
    input_ids: torch.Tensor  # [B, P_max]
    attention_mask: torch.Tensor  # [B, P_max]
    offsets: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, requests: list[Request]) -> "_Batch":
        if len(requests) == 1:
            r = requests[0]
            return cls(requests, r.input_ids, r.attention_mask, [0])
        width = max(r.input_ids.shape[1] for r in requests)
        pad = [width - r.input_ids.shape[1] for r in requests]
        ids = torch.cat([torch.nn.functional.pad(r.input_ids, (p, 0)) for r, p in zip(requests, pad)])
        mask = torch.cat([torch.nn.functional.pad(r.attention_mask, (p, 0)) for r, p in zip(requests, pad)])
        offsets, row = [], 0
        for r in requests:
            offsets.append(row)
            row += r.rows
        return cls(requests, ids, mask, offsets)

    def owner(self, row: int) -> tuple[Request, int]:
        """The request a batch row belongs to and the row's index within it."""
        i = max(j for j, start in enumerate(self.offsets) if start <= row)
        return self.requests[i], row - self.offsets[i]

    def emit(self, row: int, tokens: list[int]) -> None:
        """Route a row's new tokens to its request's callback. A callback that raises fails only its request
        (the others keep running); once every request has failed, the loop stops."""
        request, local = self.owner(row)
        if request.emit is None or request.error is not None:
            return
        try:
            request.emit(local, tokens)
        except Exception as exc:  # the caller's streamer: re-raised in the caller's thread
            request.error = exc
            if all(r.error is not None for r in self.requests):
                raise


class BatchScheduler:
    """Run one loop at a time; batch compatible waiting requests (see the module docstring).

    Args:
        run: ``run(input_ids, attention_mask, requests, emit) -> (outputs, stats)`` runs one loop over the
            merged batch (the requests' shared settings are those of ``requests[0]``).
        max_batch: most rows in one loop (1: calls are only serialised, never batched).
    """

    def __init__(self, run: Callable, max_batch: int = 1):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        self._run, self.max_batch = run, max_batch
        self._cond = threading.Condition()
        self._queue: list[Request] = []
        self._busy = False

    def submit(self, request: Request) -> tuple[list[list[int]], object]:
        """Wait for ``request``'s turn (or for another caller to run it in its batch); returns its rows' new
        tokens and the statistics of the loop it ran in. Raises what that loop (or its own streamer) raised."""
        with self._cond:
            self._queue.append(request)
            try:  # first come, first served: the oldest waiting request leads the next loop
                while not request.finished and (self._busy or self._queue[0] is not request):
                    self._cond.wait()
            except BaseException:  # interrupted while waiting: leave the queue so the next one can lead
                if request in self._queue:
                    self._queue.remove(request)
                    self._cond.notify_all()
                raise
            group = None
            if not request.finished:
                self._busy = True
                group = self._take_group(request)
        if group is not None:
            self._run_group(group)
        if request.error is not None:
            raise request.error
        return request.outputs, request.stats

    def _take_group(self, first: Request) -> list[Request]:
        """``first`` plus the oldest waiting requests with its key, up to ``max_batch`` rows (lock held)."""
        group, rows = [first], first.rows
        if first.key is not None:
            for r in self._queue:
                if r is not first and r.key == first.key and rows + r.rows <= self.max_batch:
                    group.append(r)
                    rows += r.rows
        for r in group:
            self._queue.remove(r)
        return group

    def _run_group(self, group: list[Request]) -> None:
        try:
            batch = _Batch.of(group)
            emit = batch.emit if any(r.emit is not None for r in group) else None
            outputs, stats = self._run(batch.input_ids, batch.attention_mask, group, emit)  # stats.batch_size: rows
            for r, start in zip(group, batch.offsets):
                r.outputs, r.stats = outputs[start:start + r.rows], dataclasses.replace(stats)
        except BaseException as exc:  # every waiting caller must wake up and see it
            for r in group:
                r.error = r.error or exc
        finally:
            with self._cond:
                for r in group:
                    r.finished = True
                self._busy = False
                self._cond.notify_all()
