"""The three Ray Serve deployments of a specray application: draft pool, target pool, router.

Pool replicas are hosts for gRPC servers: a draft replica runs a `DraftWorker` (workers/servers/draft_server.py),
a target replica runs the speculative engine behind a `TargetWorker` (workers/servers/target_server.py); both
register their address in the registry so that targets and the router can find them. Serve handles are used only
for lifecycle and health: tokens travel over gRPC (a Serve handle call costs milliseconds; a message on an open
gRPC stream a fraction of one).
"""

from __future__ import annotations

import logging
import os
import time
import uuid

from ray import serve

from cluster.autoscaling import SEQUENCES
from cluster.config import SpecrayConfig
from cluster.registry import Registration, lister
from workers.wire import free_port

log = logging.getLogger(__name__)


def _hosts(cfg: SpecrayConfig) -> tuple[str, str]:
    """(bind host, advertised host) for a replica's gRPC server."""
    if cfg.advertise_host == "auto":
        import ray

        return "0.0.0.0", ray.util.get_node_ip_address()
    return ("127.0.0.1" if cfg.advertise_host in ("127.0.0.1", "localhost") else "0.0.0.0"), cfg.advertise_host


def _pack_if_fp16w(model, dtype: str) -> None:
    """fp16w packs weights after the tensor-parallel split (packed matrices cannot be sliced)."""
    from workers.models.loader import resolve_dtype
    from workers.models.packed import pack_fp16_weights

    if resolve_dtype(dtype) == "fp16w":
        pack_fp16_weights(model)


def _replica_id(kind: str) -> str:
    try:
        return f"{kind}-{serve.get_replica_context().replica_id.unique_id}"
    except Exception:
        return f"{kind}-{uuid.uuid4().hex[:8]}"


class DraftPool:
    def __init__(self, config: dict):
        import torch

        from workers.drafters.registry import build_drafter, parse_draft_spec
        from workers.models.loader import load_model
        from workers.servers.draft_server import serve_draft

        cfg = SpecrayConfig.model_validate(config)
        tls = cfg.grpc_tls()  # before any model loads: a bad path fails fast
        d = cfg.draft
        torch.set_num_threads(d.threads)  # Ray sets OMP_NUM_THREADS=1; be explicit
        kind, _ = parse_draft_spec(d.drafter)
        target = load_model(cfg.target.model, d.dtype) if kind not in ("none", "ngram") else None
        # a model drafter preallocates a KV slot per sequence: cap it (sequences past the cap are refused by the
        # worker and decode without drafts), model-free drafters hold no per-sequence memory worth capping
        max_sequences = d.max_sequences if kind in ("ngram",) else min(d.max_sequences, d.max_model_sequences)
        drafter = build_drafter(d.drafter, target, dtype=d.dtype, max_batch=max_sequences,
                                max_model_len=cfg.target.max_model_len, min_confidence=d.min_confidence,
                                tree_width=d.tree_width)
        if drafter is None:
            raise ValueError("the draft pool needs a drafter (draft.drafter: none makes no sense here)")
        bind, advertise = _hosts(cfg)
        self.server, self.worker, port = serve_draft(drafter, d.drafter, host=bind, port=0,
                                                     max_sequences=max_sequences, ahead_blocks=d.ahead_blocks,
                                                     tls=tls, max_hypotheses=d.max_hypotheses)
        self.address = f"{advertise}:{port}"
        self.registration = Registration(cfg.name, "draft", _replica_id("draft"), self.address)
        self.drain_timeout_s = d.drain_timeout_s
        log.info("draft replica %s serving %s", self.address, d.drafter)

    def address_(self) -> str:
        return self.address

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    async def check_health(self) -> None:
        if not self.worker.thread.is_alive():
            raise RuntimeError("the drafting thread died")

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric: the sequences this replica drafts for (cluster/autoscaling.py)."""
        return {SEQUENCES: float(len(self.worker.seqs))}

    def __del__(self):
        try:
            self.registration.close()  # no new sequences; targets finish the live ones, then release them
            _drain(lambda: len(self.worker.seqs), self.drain_timeout_s, "draft")
            self.worker.stop()
            self.server.stop(1)
        except Exception:
            pass


def _drain(live, timeout_s: float, kind: str, poll_s: float = 0.2) -> int:
    """Wait until `live()` (the replica's live sequences) is 0 or timeout_s passed; returns what was left."""
    deadline = time.monotonic() + timeout_s
    n = live()
    if n:
        log.info("%s replica draining: %d live sequence(s), up to %.0f s", kind, n, timeout_s)
    while n and time.monotonic() < deadline:
        time.sleep(poll_s)
        n = live()
    if n:
        log.warning("%s replica shutting down with %d live sequence(s) after %.0f s of draining", kind, n, timeout_s)
    return n


class TPFollower:
    """Ranks 1.. of a target replica's TP group: a Ray actor placed in the replica's own placement group (the
    STRICT_PACK bundles of `cluster/builder.py`), so every rank is on the replica's node."""

    def run(self, config: dict, rank: int, world: int, port: int) -> dict:
        import torch

        from workers.engine.tp_group import follower_loop, init_process_group
        from workers.models.loader import load_model
        from workers.models.tp import apply_tensor_parallel

        cfg = SpecrayConfig.model_validate(config)
        torch.set_num_threads(cfg.target.threads)
        lm = load_model(cfg.target.model, cfg.target.dtype, pack=False)
        init_process_group(rank, world, "127.0.0.1", port)
        apply_tensor_parallel(lm.model, rank, world)
        _pack_if_fp16w(lm.model, cfg.target.dtype)
        try:
            return follower_loop(lm.model)
        finally:
            import torch.distributed as dist

            dist.destroy_process_group()


def _start_followers(config: dict, world: int, threads: int) -> tuple[list, int]:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = ray.util.get_current_placement_group()
    if pg is None:
        raise RuntimeError("tp > 1 needs the replica's placement group (cluster/builder.py sets it)")
    port = free_port()
    actor = ray.remote(TPFollower)
    refs = []
    for rank in range(1, world):
        follower = actor.options(
            num_cpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}}).remote()
        refs.append((follower, follower.run.remote(config, rank, world, port)))
    return refs, port


class TargetPool:
    def __init__(self, config: dict):
        import torch

        from workers.engine.async_engine import AsyncEngine
        from workers.engine.engine import SpecEngine
        from workers.engine.multi_draft import MultiDraftClient
        from workers.models.loader import load_model
        from workers.servers.target_server import TargetServer, TargetWorker

        cfg = SpecrayConfig.model_validate(config)
        tls = cfg.grpc_tls()
        t = cfg.target
        torch.set_num_threads(t.threads)
        lm = load_model(t.model, t.dtype, pack=t.tp == 1)  # a TP shard is packed after the split
        self.leader = None
        self.followers: list = []
        if t.tp > 1:  # this replica is rank 0 of its TP group; ranks 1.. follow the step plans it broadcasts
            from workers.engine.tp_group import TPLeader, init_process_group
            from workers.models.tp import apply_tensor_parallel

            self.followers, port = _start_followers(config, t.tp, t.threads)
            init_process_group(0, t.tp, "127.0.0.1", port)
            apply_tensor_parallel(lm.model, 0, t.tp)
            _pack_if_fp16w(lm.model, t.dtype)
            self.leader = TPLeader(lm.model)
        self.drafts = MultiDraftClient(k=t.num_draft_tokens, max_wait_s=t.max_draft_wait_ms / 1e3, tls=tls)
        engine = SpecEngine(lm, self.drafts, max_batch=t.max_batch, max_model_len=t.max_model_len,
                            forward=self.leader)
        self.engine = AsyncEngine(engine, max_queued=t.max_queued)
        bind, advertise = _hosts(cfg)
        self.server = TargetServer(TargetWorker(self.engine, self.drafts, cfg.served_model_name, t.tp), bind, 0,
                                   tls=tls)
        self.address = f"{advertise}:{self.server.port}"
        self.registration = Registration(cfg.name, "target", _replica_id("target"), self.address)
        self.drain_timeout_s = t.drain_timeout_s
        log.info("target replica %s serving %s (%s, tp=%d)", self.address, t.model, t.dtype, t.tp)

    def address_(self) -> str:
        return self.address

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    async def check_health(self) -> None:
        self.engine.check_health()

    def _live_sequences(self) -> int:
        s = self.engine.stats()
        return s["running"] + s["waiting"]

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric: running + waiting sequences (cluster/autoscaling.py)."""
        return {SEQUENCES: float(self._live_sequences())}

    def __del__(self):
        try:
            self.registration.close()  # the router stops picking this replica ...
            self.server.worker.draining = True  # ... also before its registry view refreshes
            _drain(self._live_sequences, self.drain_timeout_s, "target")
            self.server.stop(1)
            self.engine.shutdown()
            self.drafts.close()
            if self.leader is not None:
                self.leader.shutdown()
        except Exception:
            pass


class Router:
    """The HTTP ingress: OpenAI-compatible API over the target pool (router/api.py)."""

    def __init__(self, config: dict, target_pool=None, draft_pool=None):
        from transformers import AutoTokenizer

        from router.api import build_app
        from router.target_pool import TargetPoolClient
        from workers.models.loader import resolve

        cfg = SpecrayConfig.model_validate(config)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.target.model))
        self.pool = TargetPoolClient(lister(cfg.name, "target"), lister(cfg.name, "draft"),
                                     request_timeout_s=cfg.router.request_timeout_s,
                                     tls=cfg.grpc_tls())
        self._asgi = build_app(self.pool, cfg.served_model_name, tokenizer, cfg.router.api_key,
                             max_model_len=cfg.target.max_model_len,
                             default_num_draft_tokens=cfg.target.num_draft_tokens)

    def __serve_build_asgi_app__(self):
        return self._asgi

    async def __del__(self):
        # Serve awaits this on replica shutdown: stop the replica-discovery loop and close the gRPC channels
        # while the event loop (and its thread pool) still runs
        try:
            await self.pool.close()
        except Exception:
            pass
