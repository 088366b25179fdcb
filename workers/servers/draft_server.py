"""The draft worker: hosts any drafter behind the `DraftService` gRPC stream and drafts ahead of verification.

Every target replica opens one `Speculate` stream to this worker and multiplexes its sequences over it. One
drafting thread owns the drafter (drafters are not thread-safe) and, in a loop, drafts for every sequence that
has room to run ahead, all of them in one batched `propose` call. Blocks are k + 1 tokens: the k the target will
verify plus the draft's guess for the target's own next token, so that when a block is fully accepted and the
guess was right, the block after it (drafted while the target was verifying) is already valid.

Run-ahead is bounded by `ahead_blocks` blocks past the last verdict: 1 means "draft the next block only after the
verdict on this one" (no pipelining); 2 keeps one block in flight while the target verifies the other. Epochs are
owned by the target (see protos/specray.proto); a verdict with a higher epoch rolls this sequence back to the
committed tokens and it is drafted again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from protos import specray_pb2 as pb
from protos import specray_pb2_grpc as pb_grpc
from workers.drafters.base import DraftRequest, Drafter
from workers.wire import SERVER_OPTIONS, GrpcTLS, add_port, params_from_proto, tensor_from_proto, tensor_to_proto

log = logging.getLogger(__name__)

MAX_SEQ_TOKENS = 1 << 20


@dataclass
class _Seq:
    seq_id: str
    session: "_Session"
    k: int
    epoch: int = 0
    committed: list[int] = field(default_factory=list)
    assumed: list[int] = field(default_factory=list)  # drafted past the committed tokens, already sent
    starved: bool = False  # the drafter had nothing more to say; wait for the next verdict
    drafting: bool = False


class _Session:
    """One target replica's stream."""

    def __init__(self, peer: str):
        self.peer = peer
        self.out: queue.Queue = queue.Queue()
        self.seq_ids: set[str] = set()
        self.closed = False


class DraftWorker(pb_grpc.DraftServiceServicer):
    def __init__(self, drafter: Drafter, name: str, max_sequences: int = 256, ahead_blocks: int = 2):
        if ahead_blocks < 1:
            raise ValueError("ahead_blocks must be >= 1")
        self.drafter = drafter
        self.name = name
        self.max_sequences = max_sequences
        self.ahead_blocks = ahead_blocks
        self.seqs: dict[str, _Seq] = {}
        self.cv = threading.Condition()
        self.ops: list[tuple] = []  # drafter calls queued for the drafting thread: ("add"|"release"|"features", ...)
        self.stopped = False
        self.blocks_sent = 0
        self.thread = threading.Thread(target=self._loop, name="draft-loop", daemon=True)
        self.thread.start()

    # --- gRPC ---------------------------------------------------------------------------------------------------
    def Info(self, request, context):
        with self.cv:
            return pb.DraftInfo(drafter=self.name, feature_layers=list(self.drafter.feature_layers),
                                max_sequences=self.max_sequences, active_sequences=len(self.seqs))

    def Speculate(self, request_iterator, context):
        session = _Session(context.peer())
        reader = threading.Thread(target=self._read, args=(request_iterator, session), daemon=True)
        reader.start()
        try:
            while context.is_active() and not self.stopped:
                try:
                    msg = session.out.get(timeout=0.5)
                except queue.Empty:
                    continue
                if msg is None:
                    break
                yield msg
        finally:
            self._close_session(session)

    def _read(self, request_iterator, session: _Session) -> None:
        try:
            for msg in request_iterator:
                kind = msg.WhichOneof("kind")
                try:
                    if kind == "start":
                        self._on_start(session, msg.start)
                    elif kind == "verdict":
                        self._on_verdict(session, msg.verdict)
                    elif kind == "finish":
                        self._on_finish(msg.finish.seq_id)
                except ValueError as e:  # a bad message costs its sequence, never the stream
                    seq_id = getattr(getattr(msg, kind), "seq_id", "")
                    session.out.put(pb.DraftMessage(error=pb.DraftError(seq_id=seq_id, message=str(e))))
                    self._on_finish(seq_id)
        except grpc.RpcError:
            pass  # the target went away: _close_session frees its sequences
        finally:
            session.out.put(None)

    def _close_session(self, session: _Session) -> None:
        with self.cv:
            session.closed = True
            for seq_id in list(session.seq_ids):
                self._drop(seq_id)

    # --- state changes (stream threads) -------------------------------------------------------------------------
    def _on_start(self, session: _Session, m: pb.StartSequence) -> None:
        params = params_from_proto(m.params)
        params.validate()
        if not m.token_ids or len(m.token_ids) > MAX_SEQ_TOKENS:
            raise ValueError("a sequence starts with between 1 and 2**20 tokens")
        if not 0 <= m.k <= 64:
            raise ValueError(f"k must be in [0, 64], got {m.k}")
        with self.cv:
            if m.seq_id in self.seqs:
                self._drop(m.seq_id)
            if len(self.seqs) >= self.max_sequences:
                raise ValueError(f"draft worker is full ({self.max_sequences} sequences)")
            st = _Seq(m.seq_id, session, m.k, committed=list(m.token_ids))
            self.seqs[m.seq_id] = st
            session.seq_ids.add(m.seq_id)
            self.ops.append(("add", m.seq_id, params))
            if m.HasField("features"):
                self.ops.append(("features", m.seq_id, 0, tensor_from_proto(m.features)))
            self.cv.notify_all()

    def _on_verdict(self, session: _Session, m: pb.Verdict) -> None:
        with self.cv:
            st = self.seqs.get(m.seq_id)
            if st is None:
                return  # finished or dropped meanwhile
            if m.start != len(st.committed):
                raise ValueError(f"verdict for position {m.start}, sequence has {len(st.committed)} tokens")
            n = len(m.committed)
            if m.epoch > st.epoch or n > len(st.assumed):
                st.epoch = max(m.epoch, st.epoch)
                st.assumed = []
            else:  # same epoch: the target found our assumption right, keep what we drafted past it
                st.assumed = st.assumed[n:]
            st.committed += list(m.committed)
            st.k = m.k
            st.starved = False
            if m.HasField("features"):
                self.ops.append(("features", m.seq_id, m.start - 1, tensor_from_proto(m.features)))
            self.cv.notify_all()

    def _on_finish(self, seq_id: str) -> None:
        with self.cv:
            self._drop(seq_id)
            self.cv.notify_all()

    def _drop(self, seq_id: str) -> None:  # caller holds the lock
        st = self.seqs.pop(seq_id, None)
        if st is not None:
            st.session.seq_ids.discard(seq_id)
            self.ops.append(("release", seq_id))

    # --- the drafting thread -------------------------------------------------------------------------------------
    def _ready(self) -> list[_Seq]:
        return [s for s in self.seqs.values()
                if s.k > 0 and not s.starved and len(s.assumed) < self.ahead_blocks * (s.k + 1)]

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.stopped and not self.ops and not self._ready():
                    self.cv.wait(timeout=1.0)
                if self.stopped:
                    return
                ops, self.ops = self.ops, []
                batch = self._ready()
                snapshot = [(s, s.epoch, len(s.committed), s.committed + s.assumed) for s in batch]
            for op in ops:  # drafter calls happen on this thread only
                try:
                    if op[0] == "add":
                        self.drafter.add_sequence(op[1], op[2])
                    elif op[0] == "release":
                        self.drafter.release(op[1])
                    else:
                        self.drafter.observe_target_features(op[1], op[2], op[3])
                except Exception:  # a drafter bug must not take the worker down
                    log.exception("drafter %s failed for %s", op[0], op[1])
            if not snapshot:
                continue
            requests = [DraftRequest(s.seq_id, ctx, s.k + 1) for s, _, _, ctx in snapshot]
            try:
                # a token stream carries chains: a drafter that drafts trees streams its first branch
                proposals = [p.main_chain() for p in self.drafter.propose(requests)]
            except Exception:
                log.exception("drafter.propose failed; sending empty blocks")
                proposals = [None] * len(requests)
            now = time.time()
            with self.cv:
                for (st, epoch, ncommitted, ctx), prop in zip(snapshot, proposals):
                    if self.seqs.get(st.seq_id) is not st:
                        continue  # finished meanwhile
                    tokens = list(prop.tokens) if prop is not None else []
                    probs = prop.probs if prop is not None else None
                    start = len(ctx)
                    if st.epoch != epoch:
                        # Verdicts arrived while drafting and contradicted our assumptions. A draft slower than the
                        # target's own steps would never catch up if it threw such blocks away: keep the part that
                        # continues what the target has committed since, if the target's tokens agree with ours.
                        start, tokens, probs = _salvage(ctx, tokens, probs, st.committed)
                        if start < 0:
                            continue
                    block = pb.DraftBlock(seq_id=st.seq_id, epoch=st.epoch, start=start, tokens=tokens,
                                          drafted_at=now)
                    if probs is not None and tokens:
                        block.probs.CopyFrom(tensor_to_proto(probs[: len(tokens)].float()))
                    st.assumed += tokens
                    if len(tokens) < st.k + 1:
                        st.starved = True  # told the target all we know; more only after the next verdict
                    if not st.session.closed:
                        st.session.out.put(pb.DraftMessage(block=block))
                        self.blocks_sent += 1

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the drafting thread and wait for it: a thread still inside torch when the interpreter exits
        aborts the process."""
        with self.cv:
            self.stopped = True
            self.cv.notify_all()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)


def _salvage(ctx: list[int], tokens: list[int], probs, committed: list[int]):
    """(start, tokens, probs) of the part of a block drafted on `ctx` that still continues `committed`, or
    (-1, [], None). Only when the committed tokens reached the block (the target stepped past the old context) and
    agree with ctx + the drafted tokens so far."""
    full = ctx + tokens
    n = len(committed)
    if n < len(ctx) or n >= len(full) or full[:n] != committed:
        return -1, [], None
    skip = n - len(ctx)
    return n, tokens[skip:], (probs[skip:] if probs is not None else None)


def serve_draft(drafter: Drafter, name: str, host: str = "127.0.0.1", port: int = 0, max_sequences: int = 256,
                ahead_blocks: int = 2, max_streams: int = 64,
                tls: GrpcTLS | None = None) -> tuple[grpc.Server, DraftWorker, int]:
    """Start a draft worker's gRPC server (mutual TLS when `tls` is given); returns (server, worker, bound port)."""
    worker = DraftWorker(drafter, name, max_sequences=max_sequences, ahead_blocks=ahead_blocks)
    # each stream holds two threads (response generator + reader); bound the pool explicitly
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2 * max_streams + 4), options=SERVER_OPTIONS,
                         maximum_concurrent_rpcs=max_streams + 8)
    pb_grpc.add_DraftServiceServicer_to_server(worker, server)
    try:
        bound = add_port(server, f"{host}:{port}", tls)
    except OSError:
        worker.stop()  # its drafting thread is already running
        raise
    server.start()
    return server, worker, bound
