"""The target worker's gRPC front: `TargetService.Generate` streams one request's tokens from the engine.

The engine (`SpecEngine` in an `AsyncEngine` thread) runs the speculative loop over every sequence of this replica;
its draft side is a `MultiDraftClient` with one stream per draft replica. The gRPC server (grpc.aio) runs on its
own thread and event loop, so it works the same inside a Ray Serve replica, a plain process or a test. A cancelled
call (the router's HTTP client went away) cancels the handler, which aborts the sequence in the engine, which
tells its draft replica to free it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid

import grpc

from protos import specray_pb2 as pb
from protos import specray_pb2_grpc as pb_grpc
from workers.engine.async_engine import AsyncEngine, EngineBusy
from workers.engine.multi_draft import MultiDraftClient
from workers.engine.sequence import Request
from workers.wire import SERVER_OPTIONS, GrpcTLS, add_port, params_from_proto

log = logging.getLogger(__name__)

BUSY_METADATA = "specray-busy"  # trailing metadata key on a refusal at capacity


def request_from_proto(m: pb.GenerateRequest) -> Request:
    return Request(seq_id=m.seq_id or uuid.uuid4().hex, prompt_ids=list(m.prompt_ids), max_tokens=m.max_tokens,
                   params=params_from_proto(m.params), num_draft_tokens=m.num_draft_tokens, stop=list(m.stop),
                   ignore_eos=m.ignore_eos)


class TargetWorker(pb_grpc.TargetServiceServicer):
    def __init__(self, engine: AsyncEngine, drafts: MultiDraftClient | None, model_name: str, tp: int = 1):
        self.engine = engine
        self.drafts = drafts
        self.model_name = model_name
        self.tp = tp
        self.draining = False  # shutting down: the router stops sending new sequences here

    async def Generate(self, request: pb.GenerateRequest, context):
        req = request_from_proto(request)
        try:
            self.engine.validate(req)  # includes the sampling parameters
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.engine.at_capacity():  # before assign(): a refused request leaves nothing behind
            await self._refuse_busy(context, f"target replica at capacity ({self.engine.max_live} sequences)")
        if self.drafts is not None and req.num_draft_tokens > 0:
            self.drafts.assign(req.seq_id, request.draft_address or None)
        gen = self.engine.generate(req)
        try:
            async for d in gen:
                chunk = pb.GenerateChunk(token_ids=d.token_ids, finished=d.finished,
                                         finish_reason=d.finish_reason or "")
                if d.stats is not None:
                    s = d.stats
                    chunk.stats.CopyFrom(pb.SequenceStats(
                        prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens,
                        num_drafts=s.num_drafts, num_draft_tokens=s.num_draft_tokens,
                        num_accepted_tokens=s.num_accepted_tokens, accepted_per_pos=s.accepted_per_pos,
                        num_steps=s.num_steps))
                    if s.stop_text_end is not None:
                        chunk.stats.stop_text_end = s.stop_text_end
                yield chunk
        except ValueError as e:  # refused inside the engine thread (e.g. duplicate id)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EngineBusy as e:  # filled up since the check above (another thread): no sequence to clean up
            if self.drafts is not None:
                self.drafts.unassign(req.seq_id)
            await self._refuse_busy(context, str(e))
        finally:
            await gen.aclose()  # cancelled call -> abort the sequence in the engine

    @staticmethod
    async def _refuse_busy(context, message: str) -> None:
        """RESOURCE_EXHAUSTED marked as specray's own refusal (gRPC also uses the code for oversized messages):
        the router tries another replica, then answers 503."""
        context.set_trailing_metadata(((BUSY_METADATA, "1"),))
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    async def Info(self, request, context):
        return self.info()

    def info(self) -> pb.TargetInfo:
        eng = self.engine.engine
        s = self.engine.stats()
        msg = pb.TargetInfo(
            model=self.model_name, max_model_len=eng.max_model_len, vocab_size=eng.runner.vocab_size,
            max_batch=eng.runner.cache.num_slots, max_draft_tokens=eng.max_draft_tokens, running=s["running"],
            waiting=s["waiting"], tp=self.tp, num_drafts=s["num_drafts"], num_draft_tokens=s["num_draft_tokens"],
            num_accepted_tokens=s["num_accepted_tokens"], accepted_per_pos=s["accepted_per_pos"],
            prompt_tokens=s["prompt_tokens"], completion_tokens=s["completion_tokens"], finished=s["finished"],
            aborted=s["aborted"], fallback_steps=eng.fallback_steps, healthy=not self.draining)
        if self.draining:
            msg.error = f"draining: finishing {s['running'] + s['waiting']} sequence(s) before shutdown"
        if self.drafts is not None:
            d = self.drafts.stats()
            msg.draft_wait_seconds = d["draft_wait_seconds"]
            msg.draft_rpc_latency_s.extend(d["draft_rpc_latency_s"][-256:])
        try:
            self.engine.check_health()
        except Exception as e:
            msg.healthy, msg.error = False, str(e)
        return msg


class TargetServer:
    """Runs a TargetWorker's grpc.aio server on a background thread with its own event loop (mutual TLS when `tls`
    is given)."""

    def __init__(self, worker: TargetWorker, host: str = "127.0.0.1", port: int = 0, tls: GrpcTLS | None = None):
        self.worker = worker
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(host, port, tls), name="target-grpc", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        if not self.port:
            raise OSError(f"target gRPC server did not start on {host}:{port}")

    def _run(self, host: str, port: int, tls: GrpcTLS | None) -> None:
        asyncio.set_event_loop(self._loop)

        async def main():
            self._server = grpc.aio.server(options=SERVER_OPTIONS)
            pb_grpc.add_TargetServiceServicer_to_server(self.worker, self._server)
            self.port = add_port(self._server, f"{host}:{port}", tls)
            await self._server.start()
            self._stopped = asyncio.Event()
            self._ready.set()
            # Not wait_for_termination(): it returns as soon as stop() begins, this loop would end with it and the
            # stop() coroutine, still finishing its shutdown, would never resume (stop() timed out every time).
            await self._stopped.wait()

        try:
            self._loop.run_until_complete(main())
        except BaseException as e:
            self._error = e
            self._ready.set()

    def stop(self, grace: float = 2.0) -> None:
        if self._server is not None and self._loop.is_running():
            async def stop():
                try:
                    await self._server.stop(grace)
                finally:
                    self._stopped.set()

            fut = asyncio.run_coroutine_threadsafe(stop(), self._loop)
            try:
                fut.result(grace + 5)
            except Exception as e:  # shutting down anyway: the process is about to go
                log.warning("target gRPC server did not stop cleanly: %r", e)
        self._thread.join(grace + 5)

