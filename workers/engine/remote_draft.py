"""`RemoteDraftClient`: the target side of the draft stream (protos/specray.proto) to one draft worker.

The engine loop is unchanged: it asks `drafts()` for fresh draft tokens and reports every commit to `verdict()`.
Here `drafts()` reads tokens the draft worker has already pushed into a per-sequence buffer (keyed by position,
for the current epoch); it waits for a sequence's block only while none is buffered: at least `max_wait_s`, and as
long as a block has recently taken (an EMA, capped at `max_wait_cap_s`), after which the sequence falls back to one
plain target token. `verdict()` applies the epoch rule and sends the verdict; with run-ahead the next block is
usually already buffered when the target needs it.

If the stream breaks (draft worker dead or restarted) every sequence falls back to k = 0 at once; the client
reconnects in the background and restarts each live sequence on the new stream with its full context.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import grpc
import torch

from protos import specray_pb2 as pb
from protos import specray_pb2_grpc as pb_grpc
from workers.drafters.base import DraftProposal, DraftRequest
from workers.engine.draft_client import DraftClient
from workers.params import SamplingParams
from workers.wire import GrpcTLS, open_channel, params_to_proto, tensor_from_proto, tensor_to_proto

log = logging.getLogger(__name__)


# How long, relative to the usual verdict -> next block latency (an EMA of its mean), the target waits before it
# steps a sequence without a draft. A step without one yields a single token for a whole target forward, while the
# block it gives up on was about to bring tau tokens: waiting into the latency's tail pays. (With a model drafter,
# a draft-bound pipeline took 12 of ~40 steps without a draft at 1.25x the mean, 2-4 at 2x; bench/results/pipeline-*.
# With eagle, whose block length varies with its confidence, 2x still left 4-5 % of steps without a draft.)
WAIT_MARGIN = 3.0


@dataclass
class _SeqState:
    params: SamplingParams
    k: int
    epoch: int = 0
    started: int = -1  # connection generation the sequence was started on (-1: not yet)
    length: int = 0  # committed tokens as of the last verdict
    buffer: dict[int, int] = field(default_factory=dict)  # position -> draft token (current epoch)
    probs: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> [V] draft distribution
    empty_at: int = -1  # the draft said it has nothing at this position
    tree: tuple[int, DraftProposal] | None = None  # (start, a greedy token tree drafted there), current epoch
    sent_at: float = 0.0  # when the last verdict / start went out (draft latency accounting)


class RemoteDraftClient(DraftClient):
    def __init__(self, address: str, k: int = 4, max_wait_s: float = 0.05, feature_layers: tuple[int, ...] = (),
                 connect_timeout_s: float = 10.0, max_wait_cap_s: float = 1.0, tls: GrpcTLS | None = None):
        self.address = address
        self.default_k = k
        self.max_wait_s = max_wait_s
        self.max_wait_cap_s = max(max_wait_cap_s, max_wait_s)
        self.latency_ema: float | None = None  # verdict -> next block, seconds
        self.feature_layers = tuple(feature_layers)
        self.cv = threading.Condition()
        self.seqs: dict[str, _SeqState] = {}
        self.generation = 0
        self.alive = False
        self.closed = False
        self._out: queue.Queue | None = None
        # measurements for /metrics and the bench
        self.wait_seconds = 0.0  # target idle time waiting for draft tokens
        self.rpc_latencies: list[float] = []  # verdict sent -> next block received, seconds (bounded)
        self.reconnects = 0
        self._channel = open_channel(address, tls)
        self._stub = pb_grpc.DraftServiceStub(self._channel)
        info = self._stub.Info(pb.InfoRequest(), timeout=connect_timeout_s, wait_for_ready=True)
        self.drafter_name = info.drafter
        if tuple(info.feature_layers) and not self.feature_layers:
            self.feature_layers = tuple(info.feature_layers)
        self._connect()
        threading.Thread(target=self._watchdog, name="draft-reconnect", daemon=True).start()

    # --- connection ---------------------------------------------------------------------------------------------
    def _connect(self) -> None:
        out: queue.Queue = queue.Queue()

        def requests():
            while True:
                msg = out.get()
                if msg is None:
                    return
                yield msg

        call = self._stub.Speculate(requests())
        with self.cv:
            self.generation += 1
            self._out = out
            self.alive = True
            gen = self.generation
        threading.Thread(target=self._read, args=(call, gen), name="draft-stream", daemon=True).start()

    def _read(self, call, gen: int) -> None:
        try:
            for msg in call:
                if msg.WhichOneof("kind") == "block":
                    self._on_block(msg.block)
                else:
                    log.warning("draft worker error for %s: %s", msg.error.seq_id, msg.error.message)
                    with self.cv:
                        st = self.seqs.get(msg.error.seq_id)
                        if st is not None:
                            st.started = -2  # never retried on this sequence: it decodes without drafts
                        self.cv.notify_all()
        except grpc.RpcError as e:
            if not self.closed:
                log.warning("draft stream to %s broke: %s", self.address, e.code())
        finally:
            with self.cv:
                if gen == self.generation:
                    self.alive = False
                    self._out = None
                self.cv.notify_all()

    def _watchdog(self) -> None:
        backoff = 0.2
        while not self.closed:
            time.sleep(backoff)
            with self.cv:
                alive = self.alive
            if alive or self.closed:
                backoff = 0.2
                continue
            try:
                self._stub.Info(pb.InfoRequest(), timeout=1.0)
                self._connect()
                self.reconnects += 1
                backoff = 0.2
            except grpc.RpcError:
                backoff = min(backoff * 2, 5.0)

    def _send(self, msg: pb.TargetMessage) -> None:  # caller holds the lock
        if self._out is not None:
            self._out.put(msg)

    # --- the DraftClient interface ------------------------------------------------------------------------------
    def start(self, seq_id: str, params: SamplingParams) -> None:
        with self.cv:
            self.seqs[seq_id] = _SeqState(params, self.default_k)

    def drafts(self, requests: list[DraftRequest]) -> list[DraftProposal]:
        t0 = time.perf_counter()
        # Wait at least max_wait_s, and as long as a block usually takes (up to max_wait_cap_s): a draft slower than
        # a plain target step would otherwise never be waited for, and every step would fall back to k = 0.
        # Until the first block has been timed, wait up to the cap: one slow first step, then the estimate.
        wait = self.max_wait_cap_s if self.latency_ema is None else min(
            self.max_wait_cap_s, max(self.max_wait_s, WAIT_MARGIN * self.latency_ema))
        deadline = t0 + wait
        with self.cv:
            while True:
                pending = [r for r in requests if self._waiting_for(r)]
                left = deadline - time.perf_counter()
                if not pending or left <= 0:
                    break
                self.cv.wait(timeout=left)
            out = []
            for r in requests:
                st = self.seqs.get(r.seq_id)
                toks, probs = [], []
                n = len(r.token_ids)
                if st is not None and st.started == self.generation and st.tree is not None and st.tree[0] == n:
                    out.append(st.tree[1])  # the engine cuts it to the step's budget
                    continue
                if st is not None and st.started == self.generation:
                    while len(toks) < r.k and (n + len(toks)) in st.buffer:
                        toks.append(st.buffer[n + len(toks)])
                        p = st.probs.get(n + len(toks) - 1)
                        probs.append(p)
                full = probs and all(p is not None for p in probs)
                out.append(DraftProposal(toks, torch.stack(probs) if full else None))
        self.wait_seconds += time.perf_counter() - t0
        return out

    def _waiting_for(self, r: DraftRequest) -> bool:  # caller holds the lock
        st = self.seqs.get(r.seq_id)
        if st is None or not self.alive or st.started != self.generation or r.k == 0:
            return False
        n = len(r.token_ids)
        return n not in st.buffer and st.empty_at != n

    def verdict(self, seq_id: str, token_ids: list[int], num_new: int, feature_start: int,
                hidden: torch.Tensor | None) -> None:
        with self.cv:
            st = self.seqs.get(seq_id)
            if st is None or st.started == -2:
                return
            n = len(token_ids)
            if st.started != self.generation:  # first verdict, or a new stream after a reconnect
                if not self.alive:
                    return
                start = pb.StartSequence(seq_id=seq_id, token_ids=token_ids, params=params_to_proto(st.params),
                                         k=st.k)
                if hidden is not None and feature_start == 0 and hidden.shape[0] == n - num_new:
                    start.features.CopyFrom(tensor_to_proto(hidden))
                st.started, st.epoch, st.length, st.empty_at = self.generation, 0, n, -1
                st.buffer.clear(), st.probs.clear()
                st.tree = None
                st.sent_at = time.perf_counter()
                self._send(pb.TargetMessage(start=start))
                return
            first = n - num_new
            matched = all(st.buffer.get(first + i) == token_ids[first + i] for i in range(num_new))
            if not matched:  # a rejection, or a verified tree that took another branch than its first
                st.epoch += 1
                st.buffer.clear(), st.probs.clear()
                st.empty_at = -1
            else:
                for pos in [p for p in st.buffer if p < n]:
                    del st.buffer[pos]
                    st.probs.pop(pos, None)
            if st.tree is not None and (not matched or st.tree[0] < n):
                st.tree = None
            st.length = n
            st.sent_at = time.perf_counter()
            msg = pb.Verdict(seq_id=seq_id, epoch=st.epoch, start=first, committed=token_ids[first:],
                             num_accepted=max(0, num_new - 1), k=st.k)
            if hidden is not None:
                msg.features.CopyFrom(tensor_to_proto(hidden))
            self._send(pb.TargetMessage(verdict=msg))

    def _on_block(self, b: pb.DraftBlock) -> None:
        with self.cv:
            st = self.seqs.get(b.seq_id)
            if st is None or b.epoch != st.epoch or st.started != self.generation:
                return  # finished, or drafted on a context the target has since contradicted
            if st.sent_at:
                lat = time.perf_counter() - st.sent_at
                if len(self.rpc_latencies) < 100_000:
                    self.rpc_latencies.append(lat)
                if not b.prepared:  # how long to wait for a block is set by the blocks drafted after a verdict
                    self.latency_ema = lat if self.latency_ema is None else 0.9 * self.latency_ema + 0.1 * lat
                st.sent_at = 0.0
            probs = tensor_from_proto(b.probs) if b.HasField("probs") else None
            tokens = list(b.tokens)
            if not tokens:
                st.empty_at = b.start
            if b.parents:  # a tree: verified whole, its first branch buffered like a chain (waits, epochs)
                tree = DraftProposal(tokens, parents=list(b.parents))
                if probs is not None or len(tree.parents) != len(tokens) or not tree.within(len(tokens),
                                                                                           len(tokens)).tokens:
                    log.warning("draft worker sent a malformed tree for %s; using none of it", b.seq_id)
                    self.cv.notify_all()
                    return
                if b.start >= st.length:
                    st.tree = (b.start, tree)
                tokens = tree.main_chain().tokens
            for i, tok in enumerate(tokens):
                pos = b.start + i
                if pos >= st.length:
                    st.buffer[pos] = tok
                    if probs is not None:
                        st.probs[pos] = probs[i]
            self.cv.notify_all()

    def finish(self, seq_id: str) -> None:
        with self.cv:
            st = self.seqs.pop(seq_id, None)
            if st is not None and st.started == self.generation:
                self._send(pb.TargetMessage(finish=pb.FinishSequence(seq_id=seq_id)))

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self._send(None)
            self.cv.notify_all()
        self._channel.close()
