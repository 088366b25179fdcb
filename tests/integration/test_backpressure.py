"""Admission control: a target replica holds at most max_batch running + max_queued waiting sequences and refuses
the next one at once (gRPC RESOURCE_EXHAUSTED); the router then tries another replica, and when every one is full
answers an OpenAI-style 503 with Retry-After instead of letting the request queue into a timeout. Sequences already
admitted are not disturbed, and capacity comes back when they end (finished or cancelled)."""

from __future__ import annotations

import asyncio
import http.client
import json
import time

import pytest

from router.api import build_app
from router.target_pool import TargetPoolClient
from tests.integration.test_openai_api import serving
from workers.engine.async_engine import AsyncEngine, EngineBusy
from workers.engine.engine import SpecEngine
from workers.engine.sequence import Request
from workers.models.loader import load_model
from workers.servers.target_server import TargetServer, TargetWorker

MODEL = "tiny"


class _SlowSpecEngine(SpecEngine):
    """A real engine whose steps take a while, so a long request stays admitted during the test."""

    def step(self):
        time.sleep(0.02)
        return super().step()


@pytest.fixture(scope="module")
def target(tiny_llama):
    return load_model(str(tiny_llama))


def _engine(target, max_queued):
    return AsyncEngine(_SlowSpecEngine(target, None, max_batch=1, max_model_len=1024), max_queued=max_queued)


def _req(seq_id, max_tokens=400):
    return Request(seq_id, [3, 5, 7], max_tokens, num_draft_tokens=0, ignore_eos=True)


def test_the_engine_admits_max_batch_plus_max_queued_and_frees_on_end(target):
    eng = _engine(target, max_queued=1)

    async def collect(gen):
        return [d async for d in gen]

    async def run():
        running, queued = eng.generate(_req("running")), eng.generate(_req("queued"))
        await running.__anext__()
        first_of_queued = asyncio.ensure_future(queued.__anext__())  # admitted; waits for the slot
        await asyncio.sleep(0.1)
        with pytest.raises(EngineBusy, match="at capacity"):
            await eng.generate(_req("refused")).__anext__()
        await running.aclose()  # a cancelled stream gives its place back ...
        await first_of_queued
        after = asyncio.ensure_future(collect(eng.generate(_req("after", max_tokens=2))))
        await asyncio.sleep(0.1)
        assert not after.done()  # ... so this one is admitted (it would have raised) and queues for the slot
        await queued.aclose()
        assert (await after)[-1].finished
        assert eng._live == 0  # every generate() that was admitted was also released

    try:
        asyncio.run(run())
    finally:
        eng.shutdown()


def test_the_router_tries_another_replica_then_answers_503(target, tiny_llama):
    from transformers import AutoTokenizer

    engines = [_engine(target, max_queued=0) for _ in range(2)]
    servers = [TargetServer(TargetWorker(e, None, MODEL)) for e in engines]
    addrs = [f"127.0.0.1:{s.port}" for s in servers]
    pool = TargetPoolClient(lambda: addrs, lambda: [], refresh_s=0.05)
    app = build_app(pool, MODEL, AutoTokenizer.from_pretrained(tiny_llama), max_model_len=1024)
    body = {"model": MODEL, "prompt": [3, 5, 7], "max_tokens": 150, "ignore_eos": True, "stream": True}

    def post(stream_body):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps(stream_body).encode(),
                     headers={"Content-Type": "application/json"})
        return conn, conn.getresponse()

    try:
        with serving(app) as port:
            held = []
            for _ in range(2):  # one long stream per replica: whichever the router picks first, both get one
                conn, resp = post(body)
                assert resp.status == 200
                assert resp.readline().startswith(b"data: ")  # the first event: the stream is running on a replica
                held.append((conn, resp))
            assert sorted(s.worker.engine.stats()["running"] for s in servers) == [1, 1]
            conn, resp = post(body | {"stream": False, "max_tokens": 4})
            data = json.loads(resp.read())
            conn.close()
            assert resp.status == 503 and resp.getheader("Retry-After") == "1", (resp.status, data)
            assert data["error"]["type"] == "service_unavailable" and "at capacity" in data["error"]["message"]
            for conn, resp in held:  # the admitted streams were not disturbed and run to the end
                events = [line for line in resp.read().decode().split("\n\n") if line]
                assert events[-1] == "data: [DONE]" and '"finish_reason": "length"' in events[-2]
                conn.close()
            conn, resp = post(body | {"stream": False, "max_tokens": 4})  # capacity is back
            assert resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] == 4
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/metrics")
            assert f'specray:requests_rejected_total{{model_name="{MODEL}"}} 1.0' in conn.getresponse().read().decode()
            conn.close()
    finally:
        for s, e in zip(servers, engines):
            s.stop()
            e.shutdown()


def test_the_in_process_server_answers_503_at_capacity(target, tiny_llama):
    """`specray serve --in-process` has no router in front: its API maps the engine's refusal to the same 503."""
    from transformers import AutoTokenizer

    eng = _engine(target, max_queued=0)
    app = build_app(eng, MODEL, AutoTokenizer.from_pretrained(tiny_llama), max_model_len=1024)
    body = {"model": MODEL, "prompt": [3, 5, 7], "max_tokens": 150, "ignore_eos": True, "stream": True}
    try:
        with serving(app) as port:
            held = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            held.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"})
            resp = held.getresponse()
            assert resp.status == 200 and resp.readline().startswith(b"data: ")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                         body=json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode())
            busy = conn.getresponse()
            data = json.loads(busy.read())
            assert busy.status == 503 and busy.getheader("Retry-After") == "1", (busy.status, data)
            assert "at capacity" in data["error"]["message"]
            conn.close()
            held.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/metrics")
            page = conn.getresponse().read().decode()
            conn.close()
            assert 'specray:requests_rejected_total{model_name="tiny"} 1.0' in page
    finally:
        eng.shutdown()


def test_a_full_replica_sends_the_request_to_another_and_leaves_nothing_behind(target, tiny_llama, monkeypatch):
    """The router's first pick is forced onto the full replica: it must retry on the free one (200, not 503), and
    the refusing replica keeps no state for the refused sequence (no draft route)."""
    from workers.drafters.ngram import NgramDrafter
    from workers.engine.multi_draft import MultiDraftClient
    from workers.servers.draft_server import serve_draft

    dserver, dworker, dport = serve_draft(NgramDrafter(), "ngram")
    engines = [_engine(target, max_queued=0) for _ in range(2)]
    drafts = [MultiDraftClient(k=2) for _ in engines]
    servers = [TargetServer(TargetWorker(e, d, MODEL)) for e, d in zip(engines, drafts)]
    full, free = (f"127.0.0.1:{s.port}" for s in servers)
    pool = TargetPoolClient(lambda: [full, free], lambda: [f"127.0.0.1:{dport}"], refresh_s=0.05)
    picks = []

    def full_first(exclude):
        order = sorted((r for r in pool.targets.values() if r.healthy and r.address not in exclude),
                       key=lambda r: r.address != full)
        if not order:
            from router.target_pool import NoReplicaError
            raise NoReplicaError("none left")
        picks.append(order[0].address)
        return order[0]

    monkeypatch.setattr(pool, "_pick_target", full_first)

    async def run():
        hold = engines[0].generate(_req("hold"))  # fills the first replica directly
        await hold.__anext__()
        out = []
        async for d in pool.generate(Request("r", [3, 5, 7], 4, num_draft_tokens=2, ignore_eos=True)):
            out += d.token_ids
        await hold.aclose()
        await pool.close()
        return out

    try:
        out = asyncio.run(run())
        assert len(out) == 4 and picks == [full, free]
        assert "r" not in drafts[0].route  # refused before any state was kept for it
        assert list(drafts[1].clients) == [f"127.0.0.1:{dport}"]  # the free replica was routed to the draft
    finally:
        for s, e, d in zip(servers, engines, drafts):
            s.stop()
            e.shutdown()
            d.close()
        dworker.stop()
        dserver.stop(0)


def test_an_abort_from_outside_ends_the_stream(target):
    eng = _engine(target, max_queued=0)

    async def run():
        gen = eng.generate(_req("x"))
        await gen.__anext__()
        eng.abort("x")
        rest = [d async for d in gen]
        assert rest[-1].finished and rest[-1].finish_reason == "abort"
        assert eng._live == 0 and not eng.at_capacity()

    try:
        asyncio.run(asyncio.wait_for(run(), 30))
    finally:
        eng.shutdown()
