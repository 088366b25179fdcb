"""Pool autoscaling from the sequences replicas serve (cluster/autoscaling.py), and draining on removal."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from ray.serve.config import AutoscalingConfig

from cluster.autoscaling import POLICY, SEQUENCES, pool_load_policy, with_pool_policy
from cluster.builder import _options
from cluster.config import DraftPoolConfig, TargetPoolConfig
from cluster.deployments import _drain


def _ctx(per_replica: dict | None, serve_requests: float = 0.0, target: float = 4.0, current: int = 1):
    config = AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=target)
    return SimpleNamespace(aggregated_metrics={SEQUENCES: per_replica} if per_replica is not None else {},
                           total_num_requests=serve_requests, config=config, current_num_replicas=current,
                           target_num_replicas=current, policy_state={})


def test_policy_sizes_the_pool_by_live_sequences():
    desired, state = pool_load_policy(_ctx({"r1": 6.0, "r2": 10.0}, target=4.0, current=2))
    assert desired == 4.0 and state == {}
    assert pool_load_policy(_ctx({"r1": 0.0}))[0] == 0.0  # idle: down to min_replicas (Serve applies the bound)
    assert pool_load_policy(_ctx(None, serve_requests=8.0, current=3))[0] == 3.0  # nothing reported yet: hold


def test_serves_default_policy_is_blind_to_grpc_load():
    """Negative control: the load arrives over gRPC, so Serve counts no requests and its default policy would
    keep a busy pool at its minimum, which is why the pools need their own policy."""
    from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

    busy = _ctx({"r1": 16.0}, serve_requests=0.0, target=4.0)
    default, _ = replica_queue_length_autoscaling_policy(busy)
    assert default == 0 and pool_load_policy(busy)[0] == 4.0


def test_builder_sets_the_policy_and_serve_accepts_it():
    pool = DraftPoolConfig(autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8})
    opts = _options("d", pool)
    cfg = AutoscalingConfig(**opts["autoscaling_config"])  # what Serve validates at deploy time
    fn = cfg.policy.get_policy()
    assert cfg.policy.policy_function == POLICY and (fn.__module__, fn.__name__) == ("cluster.autoscaling", "pool_load_policy")
    assert "num_replicas" not in opts
    assert opts["graceful_shutdown_timeout_s"] == pool.drain_timeout_s + 10
    # a policy or interval the user names is kept
    own = {"policy": {"policy_function": "ray.serve.autoscaling_policy:replica_queue_length_autoscaling_policy"},
           "max_replicas": 2}
    assert with_pool_policy(own) == own
    fixed = _options("t", TargetPoolConfig(num_replicas=3))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed


def test_drain_waits_for_live_sequences_then_gives_up():
    left = iter([3, 2, 1, 0])
    t = time.monotonic()
    assert _drain(lambda: next(left), timeout_s=5, kind="target", poll_s=0.01) == 0
    assert time.monotonic() - t < 1
    t = time.monotonic()
    assert _drain(lambda: 2, timeout_s=0.2, kind="draft", poll_s=0.01) == 2  # stuck: bounded by the timeout
    assert 0.2 <= time.monotonic() - t < 1


def test_router_sends_nothing_new_to_a_replica_that_left_the_registry():
    from protos import specray_pb2 as pb
    from router.target_pool import TargetPoolClient

    async def main():
        client = TargetPoolClient(lambda: [], lambda: [])
        client._sync(client.targets, ["a:1", "b:2"], lambda ch: None)
        client._sync(client.drafts, ["c:3", "d:4"], lambda ch: None)
        for r in [*client.targets.values(), *client.drafts.values()]:
            r.healthy = True
            r.info = pb.TargetInfo() if r.address in client.targets else pb.DraftInfo()
        client.targets["b:2"].in_flight = 1  # a stream still running on b keeps it in the pool ...
        client.drafts["c:3"].in_flight = 1
        client._sync(client.targets, ["a:1"], lambda ch: None)
        client._sync(client.drafts, ["d:4"], lambda ch: None)
        assert set(client.targets) == {"a:1", "b:2"} and set(client.drafts) == {"c:3", "d:4"}
        # ... but new requests go elsewhere, even though b and c carry less load
        client.targets["a:1"].in_flight = client.drafts["d:4"].in_flight = 5
        assert {client._pick_target(set()).address for _ in range(20)} == {"a:1"}
        assert client._pick_draft().address == "d:4"
        for r in [*client.targets.values(), *client.drafts.values()]:
            await r.channel.close()

    asyncio.run(main())


def test_router_close_stops_replica_discovery_for_good():
    from router.target_pool import TargetPoolClient

    async def main():
        calls = []
        client = TargetPoolClient(lambda: calls.append(1) or ["127.0.0.1:1"], lambda: [], refresh_s=0.01)
        await client._ensure_started()
        task = client._task
        await asyncio.sleep(0.1)
        assert not task.done() and len(calls) >= 2  # the loop keeps refreshing until closed
        await client.close()
        assert task.cancelled()
        n = len(calls)
        await client._ensure_started()  # a late request after close() ...
        await asyncio.sleep(0.1)
        assert client._task is task and len(calls) == n  # ... does not restart discovery

    asyncio.run(main())


@pytest.mark.parametrize("draining", [False, True])
def test_a_draining_target_reports_itself_unhealthy(draining):
    from workers.servers.target_server import TargetWorker

    eng = SimpleNamespace(max_model_len=64, runner=SimpleNamespace(vocab_size=10, cache=SimpleNamespace(num_slots=2)),
                          max_draft_tokens=4, fallback_steps=0)
    stats = dict(running=1, waiting=1, num_drafts=0, num_draft_tokens=0, num_accepted_tokens=0, accepted_per_pos=[],
                 prompt_tokens=0, completion_tokens=0, finished=0, aborted=0)
    engine = SimpleNamespace(engine=eng, stats=lambda: stats, check_health=lambda: None)
    worker = TargetWorker(engine, None, "m")
    worker.draining = draining
    info = worker.info()
    assert info.healthy is not draining
    assert ("draining: finishing 2 sequence(s)" in info.error) is draining
