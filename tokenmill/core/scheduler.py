"""Token-budget scheduler: decides, each step, which requests advance and by how many tokens.

There is no prefill phase and no decode phase. A request is scheduled ``n`` tokens starting at its
``num_computed_tokens``; when those reach ``num_tokens`` the runner samples one more token for it. Chunked prefill,
mixed batches and recompute all follow from that one rule.

Invariants (tested in tests/core):
- a step never schedules more than ``max_num_batched_tokens`` tokens, nor more than ``max_num_seqs`` requests run;
- decode tokens of running requests are scheduled before any prefill chunk; waiting requests are admitted FIFO,
  except that with prefix caching one whose next prompt block a running request is computing waits for it (then a
  hit) while those behind it go ahead;
- priority classes (``core/priority.py``): a batch row is admitted only after the step's online admissions, and
  only while the online headroom of blocks and sequence slots stays free; while online requests run or ran lately,
  batch rows get at most ``batch_token_budget`` tokens of a step (an eighth of it while one waits or prefills); a
  full pool preempts a batch row first;
- under ``preemption_mode="none"`` a request is admitted only when blocks for its prompt plus ``max_tokens`` (capped
  at ``max_model_len``) are free, and they are taken at admission, so a running request is never preempted;
- under ``"recompute"`` blocks are taken as tokens are scheduled; when they run out the most recently admitted
  running request gives its blocks back and is recomputed later (its outputs kept);
- under ``"swap"`` the same, except that the victim's computed blocks move to host swap blocks (when they fit there)
  and are copied back when it is readmitted, at the head of its class; a step either swaps out or swaps in, never
  both (a block one frees could be the block the other fills);
- a finished request's blocks return to the pool in the step that finishes it;
- with prefix caching, a request is admitted with the cached blocks of its leading tokens as a head start on
  ``num_computed_tokens`` (never its last token); blocks are registered in the cache once full and computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tokenmill.config import EngineConfig
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.priority import BATCH, ONLINE, OnlineHeadroom, WaitingQueues
from tokenmill.core.request import Request, RequestStatus
from tokenmill.core.step import ModelRunnerOutput, ScheduledRequest, SchedulerOutput, SchedulerStats


@dataclass
class _Step:
    """What one ``schedule()`` has decided so far."""

    budget: int  # tokens left under max_num_batched_tokens
    batch_budget: int  # of those, what batch-priority rows may still take (``batch_token_budget`` beside online work)
    scheduled: dict[str, ScheduledRequest] = field(default_factory=dict)
    preempted: list[str] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # request -> its pairs

    def room(self, priority: int) -> int:
        """Tokens a request of this class may still be given in this step."""
        return self.budget if priority == ONLINE else min(self.budget, self.batch_budget)

    def add(self, req: Request, n: int, block_ids: list[int]) -> None:
        self.scheduled[req.request_id] = ScheduledRequest(req, req.num_computed_tokens, n, block_ids)
        self.budget -= n
        if req.priority != ONLINE:
            self.batch_budget -= n

    def undo(self, request_id: str) -> None:
        """Takes back a request's chunk (its request was preempted later in the step)."""
        self.swap_in.pop(request_id, None)  # (it is recomputed: what was copied in is not needed)
        sr = self.scheduled.pop(request_id, None)
        if sr is not None:
            self.budget += sr.num_scheduled_tokens
            if sr.request.priority != ONLINE:
                self.batch_budget += sr.num_scheduled_tokens


class Scheduler:
    def __init__(self, config: EngineConfig, kv_cache_manager: KVCacheManager,
                 stop_string_of: Callable[[Request], str | None] | None = None) -> None:
        """``stop_string_of(req)``: the stop string the request's output now ends with, or None; called after each
        new token of a request that has stop strings (the engine supplies it: it needs the tokenizer, which this
        core does not)."""
        if config.max_model_len is None:
            raise ValueError("the scheduler needs a resolved EngineConfig (call config.resolve())")
        self.config = config
        self.kv = kv_cache_manager
        self.stop_string_of = stop_string_of
        self.waiting = WaitingQueues()  # one FIFO per priority class (core/priority.py)
        self.headroom = OnlineHeadroom(kv_cache_manager.num_blocks, kv_cache_manager.block_size, config.max_num_seqs,
                                       config.max_model_len)
        self.running: list[Request] = []  # in admission order: the last one is the first preemption victim
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerStats()
        self._finished_since_last_step: list[Request] = []
        # prefill_first only: a wave is admitted while _wave_open, prefilled, then decoded until it drains.
        self._wave_open = True
        self._decode_phase = False

    # ---------------------------------------------------------------- requests in and out
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        """Ends requests from outside (abort): frees their blocks at once."""
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            if req in self.running:
                self.running.remove(req)
            elif req in self.waiting:
                self.waiting.remove(req)
            self._finish(req, status)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def num_running_requests(self) -> int:
        return len(self.running)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        self.kv.free(req.request_id)
        del self.requests[req.request_id]
        self._finished_since_last_step.append(req)

    # ---------------------------------------------------------------- scheduling
    def _reservation(self, req: Request) -> int:
        """Token slots a request is given at admission under preemption_mode=none: all it can ever use."""
        limit = req.num_prompt_tokens + req.max_tokens
        return min(limit, self.config.max_model_len)

    def _chunk(self, req: Request, budget: int) -> int:
        """Tokens to schedule for ``req`` under ``budget``; 0 when it cannot run this step."""
        remaining = req.num_uncomputed_tokens
        if remaining == 1:
            return 1 if budget >= 1 else 0
        if not self.config.enable_chunked_prefill:
            return remaining if remaining <= budget else 0
        return min(remaining, budget, self.config.chunk_limit)

    def _preempt(self, victim: Request, step: _Step) -> None:
        """Takes ``victim`` off the running list: swapped out (``"swap"``, where the swap space holds it, not in a
        step that swaps in) or recomputed later."""
        self.running.remove(victim)
        step.undo(victim.request_id)
        step.preempted.append(victim.request_id)
        pairs = None
        if self.config.preemption_mode == "swap" and not step.swap_in:
            pairs = self.kv.swap_out(victim.request_id, victim.num_computed_tokens)
        if pairs is not None:
            step.swap_out.extend(pairs)
            victim.status = RequestStatus.SWAPPED
            self.stats.num_swap_outs += 1
        else:
            self.kv.free(victim.request_id)
            victim.num_computed_tokens = 0
            victim.status = RequestStatus.PREEMPTED
        victim.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(victim)

    def _victim(self) -> Request:
        """The request a full pool preempts: the most recently admitted of the lowest class (a batch row first)."""
        lowest = max(r.priority for r in self.running)
        return next(r for r in reversed(self.running) if r.priority == lowest)

    def schedule(self) -> SchedulerOutput:
        """Order within a step: decode tokens (online, then batch rows in turn); running prefill chunks of online
        requests; online admissions; running prefill chunks of batch rows; batch admissions (under the online
        headroom, ``core/priority.py``). Beside online work, batch rows share a smaller budget (``_batch_budget``).
        ``prefill_first`` runs waves instead (``_schedule_wave``)."""
        cfg = self.config
        step = _Step(cfg.max_num_batched_tokens, self._batch_budget())
        self.headroom.tick()

        if cfg.scheduling_strategy == "prefill_first":
            self._schedule_wave(step)
        else:
            self._schedule_continuous(step)

        if not step.scheduled and self.has_unfinished_requests():
            raise RuntimeError(
                f"scheduler made no progress with {len(self.running)} running and {len(self.waiting)} waiting "
                f"requests ({self.kv.num_free_blocks} free blocks); this is a bug"
            )
        out = SchedulerOutput(
            scheduled=list(step.scheduled.values()),
            total_num_scheduled_tokens=cfg.max_num_batched_tokens - step.budget,
            preempted_request_ids=step.preempted,
            finished=self._finished_since_last_step,
            blocks_to_swap_out=step.swap_out,
            blocks_to_swap_in=[p for pairs in step.swap_in.values() for p in pairs],
        )
        self._finished_since_last_step = []
        self._record(out)
        return out

    def _schedule_continuous(self, step: _Step) -> None:
        """Decodes first, then prefill chunks and admissions by class (``schedule``'s order)."""
        self._run_chunks(step, self._decodes())
        self._run_chunks(step, [r for r in self.running if r.is_prefilling and r.priority == ONLINE])
        admit = not step.preempted or not step.scheduled  # after a preemption admitting would only thrash
        blocked = admit and self._admit(step, ONLINE)
        self._run_chunks(step, [r for r in self.running if r.is_prefilling and r.priority == BATCH])
        admit = admit and (not step.preempted or not step.scheduled)  # (the same rule, after the batch chunks)
        if admit and not blocked:
            self._admit(step, BATCH)

    def _schedule_wave(self, step: _Step) -> None:
        """``prefill_first``: requests run in waves. A wave opens when nothing runs; its prefills run (every class,
        admission order) and it admits while it is open; a step that can neither prefill nor admit completes the
        wave, and from that same step on the wave only decodes until it drains. A full pool closes the wave to
        admissions. One pass, one ``step``: what the prefill attempt did (a preemption, swap pairs) stays in it."""
        if not self.running:
            self._wave_open, self._decode_phase = True, False
        if not self._decode_phase:
            self._run_chunks(step, [r for r in self.running if r.is_prefilling])
            if self._wave_open and not self._admit(step, ONLINE):
                self._admit(step, BATCH)
            if not step.scheduled and self.running:
                self._wave_open, self._decode_phase = False, True
        if self._decode_phase:
            self._run_chunks(step, [r for r in self.running if not r.is_prefilling])

    def _batch_budget(self) -> int:
        """Tokens batch rows may take in this step: the whole budget with no online work; ``batch_token_budget``
        while online requests decode or ran lately (the headroom is active); an eighth of that while an online
        request waits or prefills, so its first token comes from a step almost its own."""
        cfg = self.config
        online = [r for r in self.running if r.priority == ONLINE]  # (one pass over the running requests a step)
        if self.waiting.count(ONLINE) or any(r.is_prefilling for r in online):
            return max(1, cfg.resolved_batch_token_budget // 8)
        if online or self.headroom.active:
            return cfg.resolved_batch_token_budget
        return cfg.max_num_batched_tokens

    def _decodes(self) -> list[Request]:
        """The running requests past their prompts, online first, then batch rows starting at a place that moves by
        one each step (when ``batch_token_budget`` cannot take every batch decode, each waits its turn)."""
        online = [r for r in self.running if not r.is_prefilling and r.priority == ONLINE]
        batch = [r for r in self.running if not r.is_prefilling and r.priority != ONLINE]
        if batch:
            k = self.stats.num_steps % len(batch)
            batch = batch[k:] + batch[:k]
        return online + batch

    def _run_chunks(self, step: _Step, candidates: list[Request]) -> None:
        """Schedules the next chunk of each running candidate, in order, while budget lasts; under
        ``recompute`` a full pool preempts (``_victim``) until the chunk fits."""
        for req in candidates:
            if step.budget == 0:
                break
            if req.status != RequestStatus.RUNNING:  # preempted earlier in this step
                continue
            n = self._chunk(req, step.room(req.priority))
            if n == 0:
                continue
            while not self.kv.allocate_slots(req.request_id, req.num_computed_tokens + n):
                if self.config.preemption_mode == "none":
                    raise RuntimeError(f"{req} ran out of reserved blocks under preemption_mode=none")
                victim = self._victim()
                self._preempt(victim, step)
                self._wave_open = False  # memory is full: this wave takes no more requests
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                continue
            step.add(req, n, self.kv.block_ids(req.request_id))

    def _admit(self, step: _Step, priority: int) -> bool:
        """Admits waiting requests of one class, FIFO, while budget, sequence slots and blocks last; a batch row
        leaves the online headroom free (unless nothing runs: then it takes what it needs, so a batch always
        progresses). Returns True when the class's head request did not fit in the blocks left (those behind it,
        and lower classes, then wait too)."""
        cfg = self.config
        queue = self.waiting.queues[priority]
        deferred: list[Request] = []
        blocked = False
        while queue and step.room(priority) > 0:
            gated = priority != ONLINE and bool(self.running)
            keep_free = self.headroom.blocks if gated else 0
            if len(self.running) >= cfg.max_num_seqs - (self.headroom.seqs if gated else 0):
                break
            req = queue[0]
            if req.status == RequestStatus.SWAPPED:
                if not self._swap_in(step, req, keep_free):
                    blocked = True  # it resumes first: those behind it wait
                    break
                queue.popleft()
                continue
            # a cached prefix is a head start, except for a request that wants its prompt's logprobs: a hit's logits
            # were never computed, so it computes its whole prompt (its blocks are still cached for others)
            wants_prompt = req.prompt_logprobs is not None
            hits = [] if wants_prompt else self.kv.lookup(req.request_id, req.all_token_ids, req.cache_salt)
            if (not wants_prompt and len(deferred) < cfg.max_num_seqs
                    and self.kv.next_block_pending(req.request_id, len(hits))):
                deferred.append(queue.popleft())  # its next block is being computed: a hit in a step or two
                continue
            req.num_computed_tokens = len(hits) * self.kv.block_size
            n = self._chunk(req, step.room(priority))
            # preemption_mode=none reserves all the request can use (the hits are part of it)
            slots = self._reservation(req) if cfg.preemption_mode == "none" else req.num_computed_tokens + n
            if n == 0 or not self.kv.allocate_slots(req.request_id, slots, hits, keep_free):
                req.num_computed_tokens = 0
                blocked = n > 0
                break  # FIFO: a request that does not fit blocks those behind it
            queue.popleft()
            if priority == ONLINE:
                self.headroom.observe(self._reservation(req))
            if self.kv.enable_caching:
                self.stats.prefix_cache_queries += req.num_tokens
                self.stats.prefix_cache_hits += req.num_computed_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            step.add(req, n, self.kv.block_ids(req.request_id))
        queue.extendleft(reversed(deferred))
        return blocked

    def _swap_in(self, step: _Step, req: Request, keep_free: int) -> bool:
        """Readmits a swapped-out request with its next chunk: device blocks for it, its host blocks to copy back.
        False when it cannot run in this step (no budget, a step that swaps out, too few free blocks)."""
        n = self._chunk(req, step.room(req.priority))
        if n == 0 or step.swap_out:
            return False
        pairs = self.kv.swap_in(req.request_id, req.num_computed_tokens + n, keep_free)
        if pairs is None:
            return False
        step.swap_in[req.request_id] = pairs
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        step.add(req, n, self.kv.block_ids(req.request_id))
        return True

    def _record(self, out: SchedulerOutput) -> None:
        s = self.stats
        if out.scheduled:
            s.num_steps += 1
        s.num_scheduled_tokens += out.total_num_scheduled_tokens
        s.sum_running += len(out.scheduled)
        cfg = self.config
        if (self.waiting and len(out.scheduled) < cfg.max_num_seqs
                and out.total_num_scheduled_tokens < cfg.max_num_batched_tokens):
            s.num_underfilled_steps += 1
        for sr in out.scheduled:
            if sr.num_scheduled_tokens == 1 and sr.num_computed_tokens > 0 and sr.samples:
                s.num_decode_tokens += 1
            else:
                s.num_prefill_tokens += sr.num_scheduled_tokens

    # ---------------------------------------------------------------- results
    def update_from_output(self, out: SchedulerOutput, runner_out: ModelRunnerOutput) -> list[Request]:
        """Advances every scheduled request and appends sampled tokens; returns the requests this step finished."""
        finished: list[Request] = []
        for sr in out.scheduled:
            req = sr.request
            if req.status != RequestStatus.RUNNING:  # aborted while the step ran
                continue
            req.num_computed_tokens = sr.num_computed_tokens + sr.num_scheduled_tokens
            self.kv.cache_full_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens, req.cache_salt)
            prompt_lp = runner_out.prompt_logprobs.get(req.request_id)
            if prompt_lp is not None:
                req.add_prompt_logprobs(*prompt_lp)
            token = runner_out.sampled_token_ids.get(req.request_id)
            if token is None:
                continue
            req.append_output_token(token)
            if req.logprobs is not None:
                req.logprobs.append(runner_out.logprobs.get(req.request_id, {}))
            status = self._stop_status(req, token)
            if status is not None:
                self.running.remove(req)
                self._finish(req, status)
                finished.append(req)
        return finished

    def _stop_status(self, req: Request, token: int) -> RequestStatus | None:
        """Why ``req`` ends with this token, if it does. A stop string wins over the length limit: one completed by
        the last token ``max_tokens`` allows finishes as stopped (its text is cut at the stop string, as vLLM does)."""
        if token in req.stop_token_ids:
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if req.sampling_params.stop and self.stop_string_of is not None:
            hit = self.stop_string_of(req)
            if hit is not None:
                req.stop_reason = hit
                return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
