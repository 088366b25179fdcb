"""The draft worker: hosts any drafter behind the `DraftService` gRPC stream and drafts ahead of verification.

Every target replica opens one `Speculate` stream to this worker and multiplexes its sequences over it. One
drafting thread owns the drafter (drafters are not thread-safe) and, in a loop, drafts for every sequence that
has room to run ahead, all of them in one batched `propose` call. Blocks are k + 1 tokens: the k the target will
verify plus the draft's guess for the target's own next token, so that when a block is fully accepted and the
guess was right, the block after it (drafted while the target was verifying) is already valid. Without run-ahead
(`ahead_blocks` 1) nothing follows a block before its verdict, so the guess would be wasted: blocks are k tokens.

Run-ahead is bounded by `ahead_blocks` blocks past the last verdict: 1 means "draft the next block only after the
verdict on this one" (no pipelining); 2 keeps one block in flight while the target verifies the other. Epochs are
owned by the target (see protos/specray.proto); a verdict with a higher epoch rolls this sequence back to the
committed tokens and it is drafted again.

Running ahead on "the whole block is accepted" rarely pays for a learned drafter: it ends its block where it
stops being sure, and the target rejects a token or two of most blocks. So while the target verifies, an idle
worker also prepares blocks for the verdicts a block is *likely* to get (`max_hypotheses` per block): each of the
drafter's runners-up at a position of the block (a greedy token tree's branches: "accepted up to here, then the
target picks this token instead") and the whole block accepted followed by the drafter's guesses for the target's
next token, best first by the drafter's own estimate of the outcome's probability. When the verdict's committed
context is one of them, its block goes out at once, with the verdict's epoch, instead of after a drafting round.
Nothing on the wire changes, and a block is only ever sent for the exact context the target has committed.

A drafter that drafts greedy token trees sends the whole tree (`DraftBlock.parents`), which the target verifies in
one tree-masked forward; the worker runs ahead on the tree's first branch, and a verdict that took another branch
is a rejection of that assumption like any other (a new epoch).
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
from workers.drafters.base import DraftProposal, DraftRequest, Drafter
from workers.wire import SERVER_OPTIONS, GrpcTLS, add_port, params_from_proto, tensor_from_proto, tensor_to_proto

log = logging.getLogger(__name__)

MAX_SEQ_TOKENS = 1 << 20
# A verdict outcome gets a block prepared only if the drafter gives it at least this probability: below it, the
# drafting it costs (it delays a real block that becomes due meanwhile) is rarely repaid.
MIN_HYPOTHESIS_SCORE = 0.03


@dataclass
class _Seq:
    seq_id: str
    session: "_Session"
    k: int
    epoch: int = 0
    committed: list[int] = field(default_factory=list)
    assumed: list[int] = field(default_factory=list)  # drafted past the committed tokens, already sent
    starved: bool = False  # the drafter had nothing more to say; wait for the next verdict
    sent_at: float = 0.0  # when the last block went out (perf_counter)
    version: int = 0  # bumped when a prepared block goes out: a block drafted meanwhile is for a stale context
    # verdicts the blocks in flight may get: (score, committed context after it, extend), best first; `extend`:
    # the context is a whole block accepted, the target's next token still to be guessed (the draft's first token)
    hypotheses: list[tuple[float, list[int], bool]] = field(default_factory=list)
    prepared: dict[tuple[int, ...], DraftProposal] = field(default_factory=dict)  # context -> its proposal
    budget: int = 0  # hypotheses still to draft for the blocks in flight
    hyp_gen: int = 0  # bumped when the hypotheses are dropped: results of drafting older ones are discarded


class _Session:
    """One target replica's stream."""

    def __init__(self, peer: str):
        self.peer = peer
        self.out: queue.Queue = queue.Queue()
        self.seq_ids: set[str] = set()
        self.closed = False


class DraftWorker(pb_grpc.DraftServiceServicer):
    def __init__(self, drafter: Drafter, name: str, max_sequences: int = 256, ahead_blocks: int = 2,
                 max_hypotheses: int = 6):
        if ahead_blocks < 1:
            raise ValueError("ahead_blocks must be >= 1")
        if max_hypotheses < 0:
            raise ValueError("max_hypotheses must be >= 0")
        self.drafter = drafter
        self.name = name
        self.max_sequences = max_sequences
        self.ahead_blocks = ahead_blocks
        self.max_hypotheses = max_hypotheses if ahead_blocks > 1 else 0  # preparing blocks is running ahead
        self.hypotheses_drafted = 0
        # EMAs, seconds: block sent -> its verdict back (the target's step), and drafting one batch of hypotheses
        self.verify_ema: float | None = None
        self.prepare_ema: float | None = None
        self.prepared_hits = 0  # verdicts answered with a block prepared for them
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
                                max_sequences=self.max_sequences, active_sequences=len(self.seqs),
                                blocks_sent=self.blocks_sent, hypotheses_drafted=self.hypotheses_drafted,
                                prepared_hits=self.prepared_hits)

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
            if st.sent_at:
                dt = time.perf_counter() - st.sent_at
                self.verify_ema = dt if self.verify_ema is None else 0.9 * self.verify_ema + 0.1 * dt
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
            if not st.assumed:  # the target needs a block for exactly st.committed now
                self._send_prepared(st)
            self.cv.notify_all()

    def _send_prepared(self, st: _Seq) -> None:  # caller holds the lock
        """Answer a verdict with the block prepared for its committed context, if there is one."""
        prop = st.prepared.get(tuple(st.committed)) if st.prepared else None
        if prop is not None:
            prop = prop.within(st.k + 1, len(prop.tokens))
        tokens = prop.main_chain().tokens if prop is not None and st.k > 0 else []
        self._drop_hypotheses(st)
        if not tokens:
            return
        st.assumed = list(tokens)
        st.starved = len(tokens) < st.k + 1
        st.version += 1
        self.prepared_hits += 1
        streamed = prop.is_tree and prop.probs is None
        block = pb.DraftBlock(seq_id=st.seq_id, epoch=st.epoch, start=len(st.committed),
                              tokens=prop.tokens if streamed else tokens, drafted_at=time.time(), prepared=True)
        if streamed:
            block.parents.extend(prop.parents)
        self._send_block(st, block)
        self._add_hypotheses(st, st.committed, prop, tokens, streamed)

    def _send_block(self, st: _Seq, block: pb.DraftBlock) -> None:  # caller holds the lock
        st.sent_at = time.perf_counter()
        if not st.session.closed:
            st.session.out.put(pb.DraftMessage(block=block))
            self.blocks_sent += 1

    @staticmethod
    def _drop_hypotheses(st: _Seq) -> None:
        st.hypotheses, st.prepared, st.budget = [], {}, 0
        st.hyp_gen += 1

    def _add_hypotheses(self, st: _Seq, ctx: list[int], prop: DraftProposal, block: list[int],
                        streamed: bool = False) -> None:
        """The verdicts the block just sent (drafted as `prop` on `ctx`, `block` its first branch) is likely to
        get, worth a prepared block. Greedy proposals of drafters that estimate their tokens' acceptance only
        (learned drafters). When the tree itself went out (`streamed`), a branch the target takes is a draft it
        accepts, and the target's own token follows it: those verdicts are guessed like a whole block accepted."""
        if not self.max_hypotheses or prop.confidence is None or prop.probs is not None or not block:
            return
        st.budget = self.max_hypotheses
        main = prop.main_chain()
        survive = [1.0]  # the drafter's estimate that the block's first i tokens are accepted
        for c in main.confidence[: len(block)]:
            survive.append(survive[-1] * c)
        found: list[tuple[float, list[int], bool]] = []
        if prop.is_tree:  # a branch off the block: "accepted up to its parent, then the target picks it"
            paths: list[list[int]] = []
            for tok, parent, c in zip(prop.tokens, prop.parents, prop.confidence):
                path = (paths[parent] if parent >= 0 else []) + [tok]
                paths.append(path)
                d = len(path) - 1
                # the target verifies at most k tokens, so its own token is at a position <= k
                if d <= min(len(block), st.k) and path[:d] == block[:d] and (d == len(block) or tok != block[d]):
                    found.append((survive[d] * c, ctx + path, streamed and d < st.k))
        if len(block) <= st.k:  # the target verifies the whole block and adds a token of its own: guess it
            found.append((survive[len(block)], ctx + block, True))
        st.hypotheses = sorted([h for h in st.hypotheses + found if h[0] >= MIN_HYPOTHESIS_SCORE],
                               key=lambda h: -h[0])

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
    def _block_len(self, st: _Seq) -> int:
        return st.k + 1 if self.ahead_blocks > 1 else st.k

    def _ready(self) -> list[_Seq]:
        return [s for s in self.seqs.values()
                if s.k > 0 and not s.starved and len(s.assumed) < self.ahead_blocks * self._block_len(s)]

    def _guesses(self) -> list[tuple[_Seq, int, float, list[int], bool]]:
        """Idle: the best hypothesis of every sequence that has one (one per sequence: a drafter holds one state
        per sequence), to draft in one batch. Caller holds the lock."""
        out, now = [], time.perf_counter()
        for s in self.seqs.values():
            if s.hypotheses and s.budget > 0 and self.verify_ema is not None and self.prepare_ema is not None and (
                    now + self.prepare_ema > s.sent_at + self.verify_ema):
                s.hypotheses, s.budget = [], 0  # its verdict is due before another one could be drafted
            if s.hypotheses and s.budget > 0:
                score, ctx, extend = s.hypotheses.pop(0)
                s.budget -= 1
                out.append((s, s.hyp_gen, score, ctx, extend))
        return out

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.stopped and not self.ops and not self._ready() and not any(
                        s.hypotheses and s.budget > 0 for s in self.seqs.values()):
                    self.cv.wait(timeout=1.0)
                if self.stopped:
                    return
                ops, self.ops = self.ops, []
                batch = self._ready()
                snapshot = [(s, s.epoch, s.version, s.committed + s.assumed) for s in batch]
                guesses = [] if batch or ops else self._guesses()  # real blocks (and fresh features) first
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
            if guesses:
                self._prepare(guesses)
            if not snapshot:
                continue
            requests = [DraftRequest(s.seq_id, ctx, self._block_len(s)) for s, _, _, ctx in snapshot]
            try:
                trees = self.drafter.propose(requests)
            except Exception:
                log.exception("drafter.propose failed; sending empty blocks")
                trees = [None] * len(requests)
            now = time.time()
            with self.cv:
                for (st, epoch, version, ctx), tree in zip(snapshot, trees):
                    if self.seqs.get(st.seq_id) is not st or st.version != version:
                        continue  # finished meanwhile, or a prepared block went out for the context that followed
                    # the worker assumes a tree's first branch; the target verifies the whole tree
                    prop = tree.main_chain() if tree is not None else None
                    tokens = list(prop.tokens) if prop is not None else []
                    probs = prop.probs if prop is not None else None
                    start = len(ctx)
                    streamed = tree is not None and tree.is_tree and tree.probs is None
                    if st.epoch != epoch:
                        # Verdicts arrived while drafting and contradicted our assumptions. A draft slower than the
                        # target's own steps would never catch up if it threw such blocks away: keep the part that
                        # continues what the target has committed since, if the target's tokens agree with ours.
                        start, tokens, probs = _salvage(ctx, tokens, probs, st.committed)
                        if start < 0:
                            continue
                        tree, streamed = None, False  # its branches are about the old context
                    block = pb.DraftBlock(seq_id=st.seq_id, epoch=st.epoch, start=start,
                                          tokens=tree.tokens if streamed else tokens, drafted_at=now)
                    if streamed:
                        block.parents.extend(tree.parents)
                    if probs is not None and tokens:
                        block.probs.CopyFrom(tensor_to_proto(probs[: len(tokens)].float()))
                    st.assumed += tokens
                    if len(tokens) < self._block_len(st):
                        st.starved = True  # told the target all we know; more only after the next verdict
                    self._send_block(st, block)
                    if tree is not None and st.budget == 0 and not st.prepared:
                        self._add_hypotheses(st, ctx, tree, tokens, streamed)

    def _prepare(self, guesses: list[tuple[_Seq, int, float, list[int], bool]]) -> None:
        """Draft the blocks for the guessed verdicts; see the module docstring."""
        requests = [DraftRequest(s.seq_id, ctx, s.k + 1 + extend) for s, _, _, ctx, extend in guesses]
        t0 = time.perf_counter()
        try:
            props = self.drafter.propose(requests)
        except Exception:
            log.exception("drafter.propose failed on a hypothesis")
            return
        dt = time.perf_counter() - t0
        with self.cv:
            self.prepare_ema = dt if self.prepare_ema is None else 0.9 * self.prepare_ema + 0.1 * dt
            for (st, gen, score, ctx, extend), prop in zip(guesses, props):
                if self.seqs.get(st.seq_id) is not st or st.hyp_gen != gen:
                    continue  # the verdict came meanwhile
                self.hypotheses_drafted += 1
                if not extend:
                    st.prepared[tuple(ctx)] = prop
                    continue
                # the whole block accepted: the proposal's first token guesses the target's next token, the
                # rest is the block for that verdict; the guess's runners-up are verdicts worth a block too
                if not prop.tokens:
                    continue
                st.prepared[tuple(ctx + [prop.tokens[0]])] = prop.after_first()
                if prop.is_tree and prop.confidence is not None:
                    more = [(score * c, ctx + [t], False) for i, (t, p, c) in
                            enumerate(zip(prop.tokens, prop.parents, prop.confidence))
                            if i > 0 and p < 0 and score * c >= MIN_HYPOTHESIS_SCORE]
                    st.hypotheses = sorted(st.hypotheses + more, key=lambda h: -h[0])

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
                ahead_blocks: int = 2, max_streams: int = 64, tls: GrpcTLS | None = None,
                max_hypotheses: int = 6) -> tuple[grpc.Server, DraftWorker, int]:
    """Start a draft worker's gRPC server (mutual TLS when `tls` is given); returns (server, worker, bound port)."""
    worker = DraftWorker(drafter, name, max_sequences=max_sequences, ahead_blocks=ahead_blocks,
                         max_hypotheses=max_hypotheses)
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
