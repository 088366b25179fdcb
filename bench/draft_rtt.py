"""The draft <-> target overhead of one step on loopback, without models in the way.

A draft worker with the model-free ngram drafter runs in its own process; the client here plays the target: each
step it sends a verdict that contradicts the draft (so the draft must roll back and draft anew, the worst case for
the pipeline) and waits for the next block. The time from `drafts()` being called to the block being there is the
per-step overhead a target pays when the draft is not ahead: two gRPC messages, thread hand-offs on both sides and
the (tiny) ngram proposal. Run it on a quiet machine; under CPU contention thread wake-ups dominate.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from workers.drafters.base import DraftRequest
from workers.engine.remote_draft import RemoteDraftClient
from workers.params import SamplingParams
from workers.wire import free_port

_SERVER = """
import sys, time
from workers.drafters.ngram import NgramDrafter
from workers.servers.draft_server import serve_draft
server, worker, _ = serve_draft(NgramDrafter(), "ngram", port=int(sys.argv[1]))  # keep the server referenced
time.sleep(float(sys.argv[2]))
"""


def run_draft_rtt(steps: int = 300, k: int = 4, warmup: int = 20, timeout_s: float = 120.0) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(port), str(timeout_s)])
    try:
        client = RemoteDraftClient(f"127.0.0.1:{port}", k=k, max_wait_s=1.0, connect_timeout_s=30)
        ctx = list(range(50)) * 4  # repetitive, so the ngram drafter always has a continuation
        client.start("s", SamplingParams())
        client.verdict("s", ctx, 1, 0, None)
        lat = []
        for _ in range(steps + warmup):
            t = time.perf_counter()
            (prop,) = client.drafts([DraftRequest("s", ctx, k)])
            lat.append(time.perf_counter() - t)
            new = prop.tokens[:1] + [10**6]  # accept one token, then a token the draft did not guess: epoch bump
            ctx = ctx + new
            client.verdict("s", ctx, len(new), 0, None)
        alive = client.alive
        client.close()
        if not alive:
            raise RuntimeError("the draft stream broke during the measurement")
    finally:
        proc.kill()
        proc.wait()
    s = sorted(lat[warmup:])
    return {"steps": len(s), "k": k, "round_trip_ms": {"p50": round(statistics.median(s) * 1e3, 3),
                                                       "p90": round(s[int(0.9 * (len(s) - 1))] * 1e3, 3)}}
