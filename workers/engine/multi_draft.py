"""`MultiDraftClient`: one target replica talking to many draft replicas.

The router assigns each request a draft replica (least loaded); the target keeps one `RemoteDraftClient` (one
stream) per draft replica it has been told about and routes each sequence to its own. Connecting to a new draft
replica happens on a background thread, never on the engine thread: until the stream is up, that replica's
sequences simply decode without drafts. A sequence with no (reachable) draft replica decodes without drafts.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from workers.drafters.base import DraftProposal, DraftRequest
from workers.engine.draft_client import DraftClient
from workers.engine.remote_draft import RemoteDraftClient
from workers.params import SamplingParams
from workers.wire import GrpcTLS

log = logging.getLogger(__name__)


class MultiDraftClient(DraftClient):
    def __init__(self, k: int = 4, max_wait_s: float = 0.05, connect_timeout_s: float = 5.0,
                 tls: GrpcTLS | None = None):
        self.k = k
        self.tls = tls
        self.max_wait_s = max_wait_s
        self.connect_timeout_s = connect_timeout_s
        self.lock = threading.Lock()
        self.clients: dict[str, RemoteDraftClient] = {}
        self.connecting: set[str] = set()
        self.failed_at: dict[str, float] = {}
        self.route: dict[str, str] = {}  # seq_id -> draft address
        self.default_address: str | None = None
        self.pending: dict[str, SamplingParams] = {}  # started before their draft stream was up
        self._closed = False

    # --- routing ------------------------------------------------------------------------------------------------
    def assign(self, seq_id: str, address: str | None) -> None:
        """Called before the request enters the engine: which draft replica serves this sequence."""
        address = address or self.default_address
        if not address:
            return
        with self.lock:
            self.route[seq_id] = address
        self.ensure(address)

    def unassign(self, seq_id: str) -> None:
        """Forget a route for a sequence that never entered the engine (refused)."""
        with self.lock:
            if seq_id not in self.pending:
                self.route.pop(seq_id, None)

    def ensure(self, address: str) -> None:
        with self.lock:
            if (address in self.clients or address in self.connecting or self._closed
                    or time.monotonic() - self.failed_at.get(address, -1e9) < 2.0):
                return
            self.connecting.add(address)
        threading.Thread(target=self._connect, args=(address,), daemon=True, name="draft-connect").start()

    def _connect(self, address: str) -> None:
        try:
            client = RemoteDraftClient(address, k=self.k, max_wait_s=self.max_wait_s,
                                       connect_timeout_s=self.connect_timeout_s, tls=self.tls)
        except Exception as e:  # unreachable: its sequences decode without drafts, retried after a pause
            log.warning("cannot reach draft worker %s: %s", address, e)
            with self.lock:
                self.connecting.discard(address)
                self.failed_at[address] = time.monotonic()
            return
        with self.lock:
            self.connecting.discard(address)
            if self._closed:
                client.close()
                return
            self.clients[address] = client

    def _client(self, seq_id: str) -> RemoteDraftClient | None:
        with self.lock:
            addr = self.route.get(seq_id)
            return self.clients.get(addr) if addr else None

    @property
    def feature_layers(self) -> tuple[int, ...]:  # type: ignore[override]
        with self.lock:
            for c in self.clients.values():
                if c.feature_layers:
                    return c.feature_layers
        return ()

    # --- DraftClient ---------------------------------------------------------------------------------------------
    def start(self, seq_id: str, params: SamplingParams) -> None:
        c = self._client(seq_id)
        if c is not None:
            c.start(seq_id, params)
        else:
            with self.lock:  # not connected yet: remember the params, start when the stream is up
                self.pending[seq_id] = params

    def drafts(self, requests: list[DraftRequest]) -> list[DraftProposal]:
        groups: dict[int, tuple[RemoteDraftClient, list[int]]] = {}
        out = [DraftProposal() for _ in requests]
        for i, r in enumerate(requests):
            c = self._client(r.seq_id)
            if c is not None:
                groups.setdefault(id(c), (c, []))[1].append(i)
        for c, idx in groups.values():
            for i, p in zip(idx, c.drafts([requests[i] for i in idx])):
                out[i] = p
        return out

    def verdict(self, seq_id: str, token_ids: list[int], num_new: int, feature_start: int,
                hidden: torch.Tensor | None) -> None:
        c = self._client(seq_id)
        if c is None:
            return
        with self.lock:
            params = self.pending.pop(seq_id, None)
        if params is not None:  # the stream came up after the sequence started
            c.start(seq_id, params)
        if seq_id in c.seqs:
            c.verdict(seq_id, token_ids, num_new, feature_start, hidden)

    def finish(self, seq_id: str) -> None:
        c = self._client(seq_id)
        with self.lock:
            self.route.pop(seq_id, None)
            self.pending.pop(seq_id, None)
        if c is not None:
            c.finish(seq_id)

    # --- measurements -------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        with self.lock:
            clients = list(self.clients.values())
        lat: list[float] = []
        for c in clients:
            lat += c.rpc_latencies[-1000:]
        return {"draft_wait_seconds": sum(c.wait_seconds for c in clients), "draft_rpc_latency_s": lat[-1000:],
                "draft_replicas": len(clients), "reconnects": sum(c.reconnects for c in clients)}

    def close(self) -> None:
        with self.lock:
            self._closed = True
            clients = list(self.clients.values())
            self.clients.clear()
        for c in clients:
            c.close()
