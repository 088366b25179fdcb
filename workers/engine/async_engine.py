"""An asyncio front for `SpecEngine`: one engine thread, many concurrent request streams.

    event loop(s)                         engine thread (the only one touching the engine and torch)
    -------------                         ------------------------------------------------------------
    generate(req)  --("add", req, sink)-->  inbox  --> engine.add_request     (validation errors go back
    aclose/cancel  --("abort", id, sink)->  (queue)     engine.abort            through the sink)
    shutdown()     --("stop",)----------->            --> engine.step() while there is work
    asyncio.Queue  <--call_soon_threadsafe--  sink <--  StepEvent per sequence and step

The engine is a plain synchronous loop; all requests, aborts and the stop command are handed to its thread through
one thread-safe queue, and results come back to each caller's event loop with `call_soon_threadsafe`. When the
engine has nothing to do the thread blocks on the queue (no busy spin); while it has work it drains the queue
without blocking between steps, so new requests join the running batch at the next step (continuous batching).

`generate` is an async generator: its first `__anext__` validates the request synchronously (a `ValueError` reaches
the caller before anything is yielded, i.e. before an HTTP response has started), then it yields one
`GenerationDelta` per engine step that produced tokens for the sequence; the last one has `finished=True`, the
finish reason and the sequence's counters. Cancelling or closing the iterator (the HTTP client went away) aborts
the sequence in the engine and frees its KV slot.

The cluster's target worker will expose the same interface over gRPC; the router only relies on `generate`,
`stats` and `check_health`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from workers.engine.engine import SpecEngine, StepEvent
from workers.engine.sequence import FinishReason, Request, Sequence

log = logging.getLogger(__name__)

_STOP = ("stop",)


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shutdown or a crash in `step`); no request can be served any more."""


@dataclass
class SequenceStats:
    """Counters of one finished sequence (vLLM's speculative-decoding names)."""

    prompt_tokens: int
    completion_tokens: int
    num_drafts: int  # verification steps that verified >= 1 draft token
    num_draft_tokens: int
    num_accepted_tokens: int
    accepted_per_pos: list[int]  # [max k seen]: how often draft position i was accepted
    num_steps: int
    stop_text_end: int | None  # cut the decoded output text here (a stop string matched); None = keep all

    @classmethod
    def of(cls, seq: Sequence) -> SequenceStats:
        return cls(len(seq.request.prompt_ids), len(seq.output_ids), seq.num_drafts, seq.num_draft_tokens,
                   seq.num_accepted_tokens, list(seq.accepted_per_pos), seq.num_steps, seq.stop_text_end)


@dataclass
class GenerationDelta:
    seq_id: str
    token_ids: list[int]  # [new tokens this step] (accepted drafts + the target's own token; may be empty)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the final item
    stats: SequenceStats | None = None  # on the final item only


@dataclass
class _Sink:
    """Where one request's deltas go: an asyncio.Queue living on the caller's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def put(self, item: GenerationDelta | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass


_COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "prompt_tokens", "completion_tokens")


class EngineBusy(RuntimeError):
    """The replica already holds as many sequences as it admits (`max_batch` running + `max_queued` waiting): the
    request is refused at once, before it takes memory or a slot, so the caller can try another replica or answer
    503. A queue without a bound only turns overload into timeouts."""

    retry_after_s = 1


class AsyncEngine:
    def __init__(self, engine: SpecEngine, name: str = "specray-engine", max_queued: int | None = None):
        self.engine = engine
        self.max_model_len = engine.max_model_len
        # admission: at most max_batch running + max_queued waiting (None: no bound)
        self.max_live = None if max_queued is None else engine.runner.cache.num_slots + max_queued
        self._live = 0  # generate() calls in progress, under _submit_lock
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}  # engine thread only
        # totals of sequences that have left the engine; live ones are added in _snapshot (engine thread only)
        self._retired = dict.fromkeys(_COUNTERS, 0) | {"accepted_per_pos": [], "finished": 0, "aborted": 0}
        self._stats: dict = self._snapshot()  # replaced, never mutated: readers on other threads see a whole dict
        self._error: BaseException | None = None
        self._stopped = threading.Event()
        self._submit_lock = threading.Lock()  # "not stopped -> enqueue" vs "stop -> drain" cannot interleave
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- the caller's side (any thread / event loop) ------------------------------------------------------------
    def validate(self, request: Request) -> None:
        """Raise ValueError for a request the engine would refuse. Reads only limits fixed at construction, so it
        is safe off the engine thread."""
        self.engine.validate(request)

    async def generate(self, request: Request) -> AsyncIterator[GenerationDelta]:
        self.validate(request)
        sink = _Sink(asyncio.get_running_loop())
        with self._submit_lock:
            self.check_health()
            if self._full():
                raise EngineBusy(f"this replica is at capacity ({self._live} sequences running or queued, "
                                 f"max_batch + max_queued = {self.max_live}); retry shortly")
            self._live += 1
            self._inbox.put(("add", request, sink))
        finished = False
        try:
            while True:
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._submit_lock:
                self._live -= 1
            if not finished:  # cancelled, closed early or failed: free the sequence's slot
                self._inbox.put(("abort", request.seq_id, sink))

    def abort(self, seq_id: str) -> None:
        """Abort a sequence from outside its stream; the stream ends with finish_reason "abort"."""
        self._inbox.put(("abort", seq_id, None))

    def at_capacity(self) -> bool:
        """True if generate() would refuse a new request with EngineBusy right now."""
        with self._submit_lock:
            return self._full()

    def _full(self) -> bool:  # caller holds _submit_lock
        return self.max_live is not None and self._live >= self.max_live

    def stats(self) -> dict:
        """{"running", "waiting", "finished", "aborted", "num_drafts", "num_draft_tokens", "num_accepted_tokens",
        "accepted_per_pos", "prompt_tokens", "completion_tokens"}: gauges now, counters since start (all sequences,
        including the ones still running)."""
        return dict(self._stats)

    def check_health(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine thread failed: {self._error!r}") from self._error
        if self._stopped.is_set():
            raise EngineDeadError("the engine is shut down")

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still in flight end with EngineDeadError. Idempotent."""
        if self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("engine thread did not stop within %.1fs", timeout)

    # --- the engine thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                # idle: block until a command arrives; busy: take what is there and step
                cmd = self._inbox.get() if not self.engine.has_work else self._get_nowait()
                while cmd is not None:
                    if cmd is _STOP:
                        return
                    self._handle(cmd)
                    cmd = self._get_nowait()
                if self.engine.has_work:
                    self._dispatch(self.engine.step())
                    self._stats = self._snapshot()
        except BaseException as e:  # a bug in step(): fail every caller instead of hanging them
            log.exception("engine thread crashed")
            self._error = e
        finally:
            with self._submit_lock:
                self._stopped.set()
            why = "the engine is shut down" if self._error is None else f"the engine thread failed: {self._error!r}"
            for seq_id, sink in list(self._sinks.items()):
                try:
                    self._abort(seq_id)
                except Exception:  # the engine may be in a broken state after a crash
                    log.exception("could not abort %s", seq_id)
                sink.put(EngineDeadError(why))
            self._sinks.clear()
            self._drain_after_stop(why)
            try:
                self._stats = self._snapshot()
            except Exception:
                pass

    def _get_nowait(self):
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            return None

    def _drain_after_stop(self, why: str) -> None:
        """Requests queued behind the stop command get an error rather than waiting forever."""
        while (cmd := self._get_nowait()) is not None:
            if cmd[0] == "add":
                cmd[2].put(EngineDeadError(why))

    def _handle(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, request, sink = cmd
            try:
                self.engine.add_request(request)
            except Exception as e:  # validation (ValueError), duplicate id: the caller's problem, not ours
                sink.put(e)
                return
            self._sinks[request.seq_id] = sink
            self._stats = self._snapshot()
        elif cmd[0] == "abort":
            _, seq_id, sink = cmd
            # only the stream that owns the sequence may abort it (a refused duplicate id must not kill the original)
            if seq_id in self._sinks and (sink is None or sink is self._sinks[seq_id]):
                owner = self._sinks.pop(seq_id)
                stats = self._abort(seq_id)
                if sink is None:  # aborted from outside (abort()): its stream ends now instead of waiting forever
                    owner.put(GenerationDelta(seq_id, [], True, "abort", stats))
                self._stats = self._snapshot()

    def _abort(self, seq_id: str) -> SequenceStats | None:
        seq = self.engine.sequences.get(seq_id)
        if seq is None:
            return None
        self.engine.abort(seq_id)  # also takes it out of the running batch
        stats = SequenceStats.of(seq)
        self._retire(seq, aborted=True)
        return stats

    def _dispatch(self, events: list[StepEvent]) -> None:
        for ev in events:
            sink = self._sinks.get(ev.seq_id)
            if not ev.finished:
                if sink is not None and ev.new_token_ids:
                    sink.put(GenerationDelta(ev.seq_id, list(ev.new_token_ids)))
                continue
            seq = self.engine.sequences[ev.seq_id]
            self._retire(seq, aborted=False)
            self._sinks.pop(ev.seq_id, None)
            if sink is not None:
                sink.put(GenerationDelta(ev.seq_id, list(ev.new_token_ids), True, ev.finish_reason,
                                         SequenceStats.of(seq)))

    def _retire(self, seq: Sequence, aborted: bool) -> None:
        """Move a sequence's counters into the totals and forget it in the engine."""
        r = self._retired
        s = SequenceStats.of(seq)
        for name in _COUNTERS:
            r[name] += getattr(s, name)
        r["accepted_per_pos"] = _add_lists(r["accepted_per_pos"], s.accepted_per_pos)
        r["aborted" if aborted or seq.finish_reason == FinishReason.ABORT else "finished"] += 1
        self.engine.release(seq.seq_id)

    def _snapshot(self) -> dict:
        out = {k: (list(v) if isinstance(v, list) else v) for k, v in self._retired.items()}
        for seq in self.engine.sequences.values():
            if seq.finished:
                continue
            s = SequenceStats.of(seq)
            for name in _COUNTERS:
                out[name] += getattr(s, name)
            out["accepted_per_pos"] = _add_lists(out["accepted_per_pos"], s.accepted_per_pos)
        out["fallback_steps"] = self.engine.fallback_steps
        out["running"] = len(self.engine.running)
        out["waiting"] = len(self.engine.waiting)
        return out


def _add_lists(a: list[int], b: list[int]) -> list[int]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]
