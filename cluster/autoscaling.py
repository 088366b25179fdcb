"""Serve autoscaling for the pools, driven by the load each pool really carries.

Serve's default policy counts the requests that reach a replica through Serve (handles, HTTP). The target and draft
pools get their work over their own gRPC streams (router -> target `Generate`, target <-> draft `Speculate`), so
Serve sees no requests at all on them and would keep an autoscaling pool at `min_replicas` under any load. Instead
every pool replica reports the sequences it is serving (`record_autoscaling_stats`, Serve's custom metrics), and
this policy sizes the pool the way the default one would if those sequences were Serve requests:

    desired replicas = sum over replicas of their live sequences / target_ongoing_requests

`target_ongoing_requests` in a pool's `autoscaling_config` is thus "sequences per replica": for a target, about its
`max_batch` (running + waiting); for a draft replica, how many sequences one drafter keeps ahead of verification.
Serve applies `min_replicas` / `max_replicas`, the up/down-scaling factors and delays on top, as for any policy.
The builder sets this policy on every pool with an `autoscaling_config` that does not name a policy of its own.
"""

from __future__ import annotations

from typing import Any

SEQUENCES = "specray_sequences"  # the custom metric: live sequences on a replica
POLICY = "cluster.autoscaling:pool_load_policy"


def pool_load_policy(ctx) -> tuple[float, dict[str, Any]]:
    """A Serve custom autoscaling policy: (desired replicas before bounds and delays, policy state)."""
    per_replica = (ctx.aggregated_metrics or {}).get(SEQUENCES)
    if not per_replica:
        # No report in the look-back window (replicas still starting, or a window shorter than the push interval):
        # hold. Falling back to the requests Serve sees (none, on these pools) would scale a busy pool down.
        return float(ctx.current_num_replicas), {}
    target = ctx.config.get_target_ongoing_requests() or 1.0
    return float(sum(per_replica.values())) / target, {}


def with_pool_policy(autoscaling_config: dict[str, Any]) -> dict[str, Any]:
    """The pool's autoscaling_config with this policy, unless it names a policy of its own."""
    out = dict(autoscaling_config)
    out.setdefault("policy", {"policy_function": POLICY})
    return out
