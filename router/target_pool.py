"""The router's view of the cluster: the target pool and the draft pool, reached over gRPC.

`TargetPoolClient` has the interface the HTTP layer (`router/api.py`) expects of an engine (`generate`, `stats`,
`check_health`), so the same API code serves the in-process engine and the disaggregated cluster.

Per request it picks a target replica by power-of-two choices on load (running + waiting sequences reported by
the replica, plus requests this router has in flight to it) and a draft replica by least load, then opens one
`TargetService.Generate` stream and relays the chunks. The router is never inside the per-step loop: the target
talks to the draft replica directly. Replica lists come from a callable (the cluster's registry), refreshed in the
background; per-replica load comes from `Info` polls.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable

import grpc

from protos import specray_pb2 as pb
from protos import specray_pb2_grpc as pb_grpc
from router.errors import EngineUnavailable, RequestTimeout, TargetsBusy
from workers.engine.async_engine import GenerationDelta, SequenceStats
from workers.engine.sequence import Request
from workers.servers.target_server import BUSY_METADATA
from workers.wire import GrpcTLS, open_channel, params_to_proto

log = logging.getLogger(__name__)

_SUM_FIELDS = ("running", "waiting", "num_drafts", "num_draft_tokens", "num_accepted_tokens", "prompt_tokens",
               "completion_tokens", "finished", "aborted", "fallback_steps", "draft_wait_seconds")


def _is_busy(e: grpc.aio.AioRpcError) -> bool:
    """A target's refusal at capacity (RESOURCE_EXHAUSTED with specray's marker; gRPC's own use of the code, an
    oversized message, is not retried)."""
    if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    return any(k == BUSY_METADATA for k, _ in (e.trailing_metadata() or ()))


class NoReplicaError(EngineUnavailable):
    """No healthy target replica is registered (yet): HTTP 503 with Retry-After."""


class _Replica:
    def __init__(self, address: str, stub_cls, tls: GrpcTLS | None = None):
        self.address = address
        self.channel = open_channel(address, tls, aio=True)
        self.stub = stub_cls(self.channel)
        self.info: pb.TargetInfo | pb.DraftInfo | None = None
        self.in_flight = 0
        self.healthy = False
        self.reported = False  # its being unreachable has been logged
        self.listed = True  # still registered; a replica leaving the pool keeps its streams but gets no new ones
        self.seen = time.monotonic()

    def load(self) -> float:
        if isinstance(self.info, pb.TargetInfo):
            return self.info.running + self.info.waiting + self.in_flight
        if isinstance(self.info, pb.DraftInfo):
            return self.info.active_sequences + self.in_flight
        return self.in_flight


class TargetPoolClient:
    def __init__(self, list_targets: Callable[[], list[str]], list_drafts: Callable[[], list[str]] | None = None,
                 refresh_s: float = 0.5, request_timeout_s: float = 600.0, wait_for_replica_s: float = 10.0,
                 tls: GrpcTLS | None = None):
        self.list_targets = list_targets
        self.tls = tls
        self.list_drafts = list_drafts or (lambda: [])
        self.refresh_s = refresh_s
        self.request_timeout_s = request_timeout_s
        self.wait_for_replica_s = wait_for_replica_s
        self.targets: dict[str, _Replica] = {}
        self.drafts: dict[str, _Replica] = {}
        self._task: asyncio.Task | None = None
        self._first_refresh: asyncio.Event | None = None

    # --- replica discovery --------------------------------------------------------------------------------------
    async def _ensure_started(self) -> None:
        if self._task is None:
            self._first_refresh = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._refresh_loop())
        if not self._first_refresh.is_set():
            await asyncio.wait_for(self._first_refresh.wait(), timeout=30)

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as e:
                if isinstance(e, RuntimeError) and "after shutdown" in str(e):  # the loop's thread pool is gone:
                    return  # the replica is shutting down without close() (close() cancels this loop first)
                log.exception("replica refresh failed")
            self._first_refresh.set()
            await asyncio.sleep(self.refresh_s)

    async def refresh(self) -> None:
        targets = await asyncio.to_thread(self.list_targets)
        drafts = await asyncio.to_thread(self.list_drafts)
        self._sync(self.targets, targets, pb_grpc.TargetServiceStub, self.tls)
        self._sync(self.drafts, drafts, pb_grpc.DraftServiceStub, self.tls)
        await asyncio.gather(*(self._poll(r) for r in [*self.targets.values(), *self.drafts.values()]))

    @staticmethod
    def _sync(pool: dict[str, _Replica], addresses: list[str], stub_cls, tls: GrpcTLS | None = None) -> None:
        for a in addresses:
            if a not in pool:
                pool[a] = _Replica(a, stub_cls, tls)
        for a, r in pool.items():
            r.listed = a in addresses
        for a in [a for a in pool if a not in addresses and pool[a].in_flight == 0]:
            asyncio.get_running_loop().create_task(pool.pop(a).channel.close())

    @staticmethod
    async def _poll(r: _Replica) -> None:
        try:
            r.info = await r.stub.Info(pb.InfoRequest(), timeout=2.0)
            r.healthy = getattr(r.info, "healthy", True)
            r.reported = False
        except grpc.aio.AioRpcError as e:
            if not r.reported:  # once per outage: a TLS mismatch would otherwise look like "no replica", silently
                log.warning("replica %s unreachable: %s: %s", r.address, e.code().name, e.details())
                r.reported = True
            r.healthy = False

    def _candidates(self, exclude: set[str]) -> list[_Replica]:
        """Target replicas a new request may go to: healthy, still registered, not tried already."""
        return [r for r in self.targets.values() if r.healthy and r.listed and r.address not in exclude]

    def _pick_target(self, exclude: set[str]) -> _Replica:
        healthy = self._candidates(exclude)
        if not healthy:
            raise NoReplicaError("no healthy target replica is available")
        a, b = random.sample(healthy, 2) if len(healthy) > 1 else (healthy[0], healthy[0])
        return a if a.load() <= b.load() else b  # power of two choices

    async def _wait_for_target(self, exclude: set[str]) -> _Replica:
        """A healthy target, waiting up to wait_for_replica_s for one to come up (the app just started, or the
        pool is replacing a replica): a short wait is kinder to clients than an error."""
        deadline = time.monotonic() + self.wait_for_replica_s
        while True:
            try:
                return self._pick_target(exclude)
            except NoReplicaError:
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(min(self.refresh_s, 0.1))

    def _pick_draft(self) -> _Replica | None:
        healthy = [r for r in self.drafts.values() if r.healthy and r.listed]
        return min(healthy, key=lambda r: r.load()) if healthy else None

    # --- the engine interface -----------------------------------------------------------------------------------
    async def generate(self, request: Request) -> AsyncIterator[GenerationDelta]:
        await self._ensure_started()
        msg = pb.GenerateRequest(seq_id=request.seq_id, prompt_ids=request.prompt_ids,
                                 max_tokens=request.max_tokens, params=params_to_proto(request.params),
                                 num_draft_tokens=request.num_draft_tokens, stop=request.stop,
                                 ignore_eos=request.ignore_eos)
        tried: set[str] = set()
        busy = ""  # a replica's "at capacity" refusal, if any
        while True:
            target = await self._wait_for_target(tried)
            draft = self._pick_draft() if request.num_draft_tokens > 0 else None
            msg.draft_address = draft.address if draft else ""
            started = False
            target.in_flight += 1
            if draft:
                draft.in_flight += 1
            call = target.stub.Generate(msg, timeout=self.request_timeout_s)
            try:
                async for chunk in call:
                    started = True
                    yield _delta(request.seq_id, chunk)
                    if chunk.finished:
                        return
                return
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ValueError(e.details()) from None
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # the target saw the call end and aborted it
                    raise RequestTimeout(f"the request did not finish within {self.request_timeout_s:g} s "
                                         "(router.request_timeout_s)") from None
                if not started and _is_busy(e):  # this replica is full: try the others
                    tried.add(target.address)
                    busy = e.details()
                    if not self._candidates(tried):
                        raise TargetsBusy(f"every target replica is at capacity ({busy})") from None
                    continue
                if not started and e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN):
                    target.healthy = False  # replica died before serving us: try another one
                    tried.add(target.address)
                    log.warning("target %s unavailable (%s); retrying elsewhere", target.address, e.code())
                    if busy and not self._candidates(tried):  # the rest refused as full: say so, now
                        raise TargetsBusy(f"every target replica is at capacity or down ({busy})") from None
                    continue
                raise RuntimeError(f"target replica {target.address} failed: {e.code().name}: {e.details()}") \
                    from None
            finally:
                call.cancel()  # no-op when finished; aborts the sequence when the HTTP client went away
                target.in_flight -= 1
                if draft:
                    draft.in_flight -= 1

    def stats(self) -> dict:
        out: dict = {k: 0 for k in _SUM_FIELDS}
        out["accepted_per_pos"] = []
        lat: list[float] = []
        for r in self.targets.values():
            if not isinstance(r.info, pb.TargetInfo):
                continue
            for k in _SUM_FIELDS:
                out[k] += getattr(r.info, k)
            app = list(r.info.accepted_per_pos)
            acc = out["accepted_per_pos"]
            out["accepted_per_pos"] = [(acc[i] if i < len(acc) else 0) + (app[i] if i < len(app) else 0)
                                       for i in range(max(len(acc), len(app)))]
            lat += list(r.info.draft_rpc_latency_s)
        out["draft_rpc_latency_s"] = lat
        out["target_replicas"] = sum(r.healthy for r in self.targets.values())
        out["draft_replicas"] = sum(r.healthy for r in self.drafts.values())
        return out

    async def check_health(self) -> None:
        await self._ensure_started()
        if not any(r.healthy for r in self.targets.values()):
            raise NoReplicaError("no healthy target replica")

    async def close(self) -> None:
        if self._task is not None:  # kept (cancelled), so that a late request does not restart discovery
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for r in [*self.targets.values(), *self.drafts.values()]:
            await r.channel.close()


def _delta(seq_id: str, chunk: pb.GenerateChunk) -> GenerationDelta:
    stats = None
    if chunk.finished and chunk.HasField("stats"):
        s = chunk.stats
        stats = SequenceStats(s.prompt_tokens, s.completion_tokens, s.num_drafts, s.num_draft_tokens,
                              s.num_accepted_tokens, list(s.accepted_per_pos), s.num_steps,
                              s.stop_text_end if s.HasField("stop_text_end") else None)
    return GenerationDelta(seq_id, list(chunk.token_ids), chunk.finished, chunk.finish_reason or None, stats)
