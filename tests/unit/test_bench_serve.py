"""bench/serve.py against a fake OpenAI streaming server whose timings are known.

The fake server (FastAPI + uvicorn on 127.0.0.1, a free port, in a thread) reads its behaviour from the prompt
itself, e.g. "tokens=6 first=0.05 gap=0.01 per_chunk=2 usage=0 mode=ok": it sleeps `first` seconds, then sends
`tokens` tokens `per_chunk` at a time with `gap` seconds between chunks, then (if asked and `usage=1`) the usage
chunk and `data: [DONE]`. A chat stream opens with a role-only chunk at once, which must not count as the first
token. Modes other than ok produce the failures the client must count as errors.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bench.serve import endpoint_url, percentiles, run_serve_bench, throughput_at_slo
from workers.wire import free_port

MODEL = "fake-model"
API_KEY = "test-key"


def _spec(prompt: str) -> dict:
    spec = {"tokens": 6, "first": 0.05, "gap": 0.01, "per_chunk": 1, "usage": 1, "mode": "ok"}
    for part in prompt.split():
        k, _, v = part.partition("=")
        if k in spec:
            spec[k] = v if k == "mode" else float(v)
    return spec


def _build_app(seen: list) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    async def stream(request: Request, chat: bool):
        body = await request.json()
        seen.append({"body": body, "auth": request.headers.get("authorization"), "chat": chat})
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        spec = _spec(prompt)
        if spec["mode"] == "http500":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and spec["usage"]
        n, per_chunk = int(spec["tokens"]), int(spec["per_chunk"])

        def sse(choices, **extra) -> str:
            return "data: " + json.dumps({"id": "x", "model": MODEL, "choices": choices, **extra}) + "\n\n"

        def piece(text: str, finish=None) -> dict:
            if chat:
                return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish}

        async def events():
            if chat:
                yield sse([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            if spec["mode"] == "slow":
                await asyncio.sleep(30)
            await asyncio.sleep(spec["first"])
            sent = 0
            while sent < n:
                k = min(per_chunk, n - sent)
                yield sse([piece("tok " * k)])
                sent += k
                if spec["mode"] == "inband":
                    yield "data: " + json.dumps({"error": {"message": "engine died"}}) + "\n\n"
                    return
                if sent < n:
                    await asyncio.sleep(spec["gap"])
            if spec["mode"] == "truncate":
                return
            yield sse([piece("", "length")])
            if include_usage:
                yield sse([], usage={"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await stream(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await stream(request, chat=True)

    return app


@pytest.fixture(scope="module")
def fake_server():
    import uvicorn

    seen: list = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_build_app(seen), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the fake server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", seen
    server.should_exit = True
    thread.join(5)
    sock.close()


# --- pure helpers ---------------------------------------------------------------------------------------------

def test_percentiles_linear_interpolation_and_worse_tail():
    xs = list(range(1, 11))  # 1..10
    assert percentiles(xs) == pytest.approx({"p50": 5.5, "p90": 9.1})
    # for speeds the p90 is the slow tail: the value 90% of requests reach
    assert percentiles(xs, higher_is_better=True) == pytest.approx({"p50": 5.5, "p90": 1.9})
    assert percentiles([]) == {"p50": None, "p90": None}
    assert percentiles([None, 4.0]) == {"p50": 4.0, "p90": 4.0}
    with pytest.raises(ValueError):
        percentiles(xs, qs=(101,))


def test_throughput_at_slo_needs_median_and_tail():
    levels = [
        {"concurrency": 1, "aggregate_tokens_per_s": 100.0, "per_user_tokens_per_s": {"p50": 30.0, "p90": 25.0}},
        # median passes but the slow tail does not: must not count at SLO 20 (negative control)
        {"concurrency": 4, "aggregate_tokens_per_s": 200.0, "per_user_tokens_per_s": {"p50": 22.0, "p90": 15.0}},
        {"concurrency": 16, "aggregate_tokens_per_s": 300.0, "per_user_tokens_per_s": {"p50": 10.0, "p90": 5.0}},
        {"concurrency": 64, "aggregate_tokens_per_s": 0.0, "per_user_tokens_per_s": {"p50": None, "p90": None}},
    ]
    assert throughput_at_slo(levels, 20.0) == 100.0
    assert throughput_at_slo(levels, 15.0) == 200.0
    assert throughput_at_slo(levels, 1.0) == 300.0
    assert throughput_at_slo(levels, 100.0) is None


def test_endpoint_url():
    assert endpoint_url("http://127.0.0.1:8000", chat=False) == "http://127.0.0.1:8000/v1/completions"
    assert endpoint_url("http://127.0.0.1:8000/v1/", chat=True) == "http://127.0.0.1:8000/v1/chat/completions"
    full = "http://127.0.0.1:8000/v1/chat/completions"
    assert endpoint_url(full, chat=False) == full
    with pytest.raises(ValueError):
        endpoint_url("127.0.0.1:8000", chat=False)


def test_bad_arguments_fail_before_any_request():
    with pytest.raises(ValueError):
        run_serve_bench("http://127.0.0.1:9", [], [1], 8)
    with pytest.raises(ValueError):
        run_serve_bench("http://127.0.0.1:9", [{"prompt": "x"}], [0], 8)


# --- against the fake server ----------------------------------------------------------------------------------

def test_completions_stats_match_the_server_timing(fake_server, tmp_path):
    url, seen = fake_server
    seen.clear()
    prompts = [{"id": "a", "prompt": "tokens=8 first=0.1 gap=0.01"}]
    records = tmp_path / "rows.jsonl"
    out = run_serve_bench(url, prompts, [1], max_tokens=8, requests_per_level=3, timeout_s=10, api_key=API_KEY,
                          records=str(records))
    assert out["url"] == f"{url}/v1/completions" and out["model"] == MODEL and out["max_tokens"] == 8
    (lv,) = out["levels"]
    assert lv["concurrency"] == 1 and lv["requests"] == 3 and lv["errors"] == 0
    assert lv["output_tokens"] == 24 and lv["usage_reported"] == 3
    assert 0.1 <= lv["ttft_s"]["p50"] < 0.1 + 0.15  # the first sleep, plus local overhead
    assert 0.008 <= lv["tpot_s"]["p50"] < 0.05  # 7 gaps of 10 ms after the first token
    assert lv["per_user_tokens_per_s"]["p50"] == pytest.approx(1 / lv["tpot_s"]["p50"], rel=0.05)
    assert lv["e2e_s"]["p50"] >= 0.1 + 7 * 0.01
    assert lv["aggregate_tokens_per_s"] == pytest.approx(24 / lv["wall_s"], rel=1e-3)
    # the request itself: streamed, usage asked for, the key sent, the model taken from /v1/models
    body = seen[-1]["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == MODEL and body["max_tokens"] == 8 and body["prompt"] == prompts[0]["prompt"]
    assert seen[-1]["auth"] == f"Bearer {API_KEY}"
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(rows) == 3 and all(r["ok"] and r["output_tokens"] == 8 and r["prompt_id"] == "a" for r in rows)


def test_chat_role_chunk_is_not_the_first_token_and_chunks_count_without_usage(fake_server):
    url, seen = fake_server
    prompts = [{"id": "c", "prompt": "tokens=6 first=0.08 gap=0.01 per_chunk=2 usage=0"}]
    out = run_serve_bench(url, prompts, [2], max_tokens=6, chat=True, requests_per_level=2, timeout_s=10,
                          model="explicit-name")
    (lv,) = out["levels"]
    assert lv["errors"] == 0 and lv["usage_reported"] == 0
    assert lv["ttft_s"]["p50"] >= 0.08  # the role-only chunk arrives at once; it is not text
    assert lv["output_tokens"] == 2 * 3  # no usage: 3 text chunks per request (an undercount, documented)
    assert seen[-1]["body"]["model"] == "explicit-name" and seen[-1]["chat"]
    assert seen[-1]["body"]["messages"] == [{"role": "user", "content": prompts[0]["prompt"]}]


def test_usage_is_preferred_over_chunk_count(fake_server):
    url, _ = fake_server
    prompts = [{"prompt": "tokens=6 first=0.02 gap=0.01 per_chunk=3"}]
    (lv,) = run_serve_bench(url, prompts, [1], max_tokens=6, requests_per_level=2, timeout_s=10)["levels"]
    assert lv["output_tokens"] == 12 and lv["usage_reported"] == 2
    # TPOT uses the real token count: (e2e - ttft) spans one 10 ms gap shared by 5 further tokens
    assert lv["tpot_s"]["p50"] < 0.01


def test_aggregate_throughput_rises_with_concurrency(fake_server):
    url, _ = fake_server
    prompts = [{"prompt": "tokens=6 first=0.05 gap=0.01"}]
    out = run_serve_bench(url, prompts, [1, 4], max_tokens=6, requests_per_level=4, timeout_s=10,
                          slo_tokens_per_s=20.0)
    one, four = out["levels"]
    assert one["errors"] == four["errors"] == 0 and one["output_tokens"] == four["output_tokens"] == 24
    # the fake server overlaps requests fully: 4 concurrent users get ~4x the aggregate at the same per-user speed
    assert four["aggregate_tokens_per_s"] > 2 * one["aggregate_tokens_per_s"]
    assert four["per_user_tokens_per_s"]["p50"] > 20.0
    assert out["throughput_at_slo"] == four["aggregate_tokens_per_s"]


def test_failures_are_counted_and_left_out_of_the_statistics(fake_server):
    url, _ = fake_server
    prompts = [{"id": "ok", "prompt": "tokens=4 first=0.01 gap=0.005"},
               {"id": "500", "prompt": "mode=http500"},
               {"id": "cut", "prompt": "tokens=4 first=0.01 gap=0.005 mode=truncate"},
               {"id": "err", "prompt": "tokens=4 first=0.01 mode=inband"}]
    (lv,) = run_serve_bench(url, prompts, [2], max_tokens=4, requests_per_level=4, timeout_s=10)["levels"]
    assert lv["requests"] == 4 and lv["errors"] == 3 and lv["output_tokens"] == 4
    assert lv["ttft_s"]["p50"] is not None  # from the one good request only
    joined = " | ".join(lv["error_examples"])
    assert "HTTP 500" in joined and "without [DONE]" in joined and "engine died" in joined


def test_a_stalled_request_times_out(fake_server):
    url, _ = fake_server
    t0 = time.perf_counter()
    (lv,) = run_serve_bench(url, [{"prompt": "mode=slow"}], [1], max_tokens=4, requests_per_level=1,
                            timeout_s=0.3)["levels"]
    assert time.perf_counter() - t0 < 5
    assert lv["errors"] == 1 and "timed out" in lv["error_examples"][0]
    assert lv["aggregate_tokens_per_s"] == 0.0 and lv["ttft_s"] == {"p50": None, "p90": None}


def test_unreachable_server_is_an_error_not_a_hang():
    port = free_port()  # nobody listens on it
    (lv,) = run_serve_bench(f"http://127.0.0.1:{port}", [{"prompt": "x"}], [1], max_tokens=4,
                            requests_per_level=2, timeout_s=2, model="m")["levels"]
    assert lv["requests"] == 2 and lv["errors"] == 2
