"""Which sequences run in the next step: prefill first, then batched decode.

Admission counts what a sequence is expected to hold when it finishes (prompt + max_new_tokens rows in the dense
group; the kept prompt + max_new_tokens * the observed keep rate in the sparse group), so the engine admits as many
sequences as the budget will carry instead of admitting on prompt size and thrashing later. When keep decisions
run above the estimate and the budget runs out anyway, the newest running sequence is preempted by swapping (which
keeps a Dynamic-LLaVA cache exact: recomputing would re-admit dropped tokens)."""

from __future__ import annotations

from collections import deque

from dynllava.runtime.kv_cache import PagedKVCache, SeqKV
from dynllava.runtime.sequence import Sequence, Status


class Scheduler:
    def __init__(self, cache: PagedKVCache, max_batch: int, max_prefill_tokens: int, prompt_rows, final_rows):
        self.cache = cache
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.prompt_rows = prompt_rows  # seq -> (dense rows, sparse rows) its prefill will hold
        self.final_rows = final_rows  # seq -> (dense rows, sparse rows) it is expected to hold at the end
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[str, list[Sequence]]:
        """("prefill", new sequences) or ("decode", running sequences) or ("idle", [])."""
        self._resume_swapped()
        batch, tokens = [], 0
        while self.waiting and self.waiting[0].status == Status.WAITING \
                and len(self.running) + len(batch) < self.max_batch:
            seq = self.waiting[0]
            dense, sparse = self.prompt_rows(seq)
            if batch and tokens + dense > self.max_prefill_tokens:
                break
            if not self.cache.can_reserve(seq.kv, dense + 1, sparse + 1) or \
                    self._projected(self.running + batch + [seq]) > self.cache.budget_bytes:
                break
            self.cache.reserve(seq.kv, dense + 1, sparse + 1)
            batch.append(self.waiting.popleft())
            tokens += dense
        if batch:
            for seq in batch:
                seq.status = Status.RUNNING
            self.running += batch
            return "prefill", batch
        if not self.running:
            return "idle", []
        self._make_room_for_decode()
        return "decode", list(self.running)

    def _projected(self, seqs: list[Sequence]) -> int:
        """Bytes these sequences are expected to hold when they finish (at least what they hold now)."""
        total = 0
        for seq in seqs:
            held = self.cache.extra_bytes(SeqKV(), seq.kv.dense_len + 1, seq.kv.sparse_len + 1)
            total += max(held, self.cache.extra_bytes(SeqKV(), *self.final_rows(seq)))
        return total

    def _make_room_for_decode(self) -> None:
        """Every running sequence needs the slot its next row goes to; swap out the newest until they fit."""
        while True:
            need = sum(self.cache.extra_bytes(s.kv, s.kv.dense_len + 1, s.kv.sparse_len + 1) for s in self.running)
            if self.cache.used_bytes + need <= self.cache.budget_bytes or len(self.running) == 1:
                break
            victim = self.running.pop()
            victim.swapped = self.cache.swap_out(victim.kv)
            victim.status = Status.SWAPPED
            victim.stats.preemptions += 1
            self.preemptions += 1
            self.waiting.appendleft(victim)
        for seq in self.running:
            self.cache.reserve(seq.kv, seq.kv.dense_len + 1, seq.kv.sparse_len + 1)

    def _resume_swapped(self) -> None:
        while self.waiting and self.waiting[0].status == Status.SWAPPED and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            state = seq.swapped.state
            if not self.cache.can_reserve(state, state.dense_len + 1, state.sparse_len + 1) or \
                    self._projected(self.running + [seq]) > self.cache.budget_bytes and self.running:
                return
            self.waiting.popleft()
            seq.kv = self.cache.swap_in(seq.swapped)
            seq.swapped = None
            seq.status = Status.RUNNING
            self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Return a sequence's blocks (finished or cancelled) and forget it."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.free(seq.kv)
        seq.swapped = None
        seq.status = Status.FINISHED
