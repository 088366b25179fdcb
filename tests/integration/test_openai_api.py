"""The OpenAI-compatible server end to end, in process: tiny random llama, ngram drafter, uvicorn on loopback.

Clients are the real `openai` package (the happy paths) and raw `http.client` (bad bodies, disconnects), every call
bounded by a timeout. Greedy outputs are compared with the same engine run in process without HTTP, so the router's
tokenisation, detokenisation, stop handling and streaming are checked against ground truth, not against themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
import openai
import pytest
import uvicorn

from cluster.local_serve import build_stack
from router.api import IncrementalDetokenizer, build_app
from workers.drafters.registry import build_drafter
from workers.engine.async_engine import GenerationDelta
from workers.engine.draft_client import InProcessDraftClient
from workers.engine.engine import SpecEngine
from workers.engine.sequence import Request
from workers.models.loader import load_model
from workers.wire import free_port

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny-llama"
KEY = "test-key"
MAX_LEN = 512  # small context keeps the "up to context" and disconnect cases fast
K = 4
TIMEOUT = 30.0
PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world! How are you?"}]


@contextlib.contextmanager
def serving(app):
    """uvicorn on a free loopback port in a background thread; yields the port, stops the server on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while not srv.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        yield sock.getsockname()[1]
    finally:
        srv.should_exit = True
        thread.join(TIMEOUT)
        sock.close()
        assert not thread.is_alive(), "server did not stop"


@pytest.fixture(scope="module")
def server(tiny_llama):
    stack = build_stack(str(tiny_llama), draft="ngram", k=K, max_batch=4, api_key=KEY, max_model_len=MAX_LEN,
                        model_name=MODEL)
    try:
        with serving(stack.app) as port:
            stack.port = port
            yield stack
    finally:
        stack.async_engine.shutdown()
    assert not stack.async_engine.is_running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY, timeout=TIMEOUT, max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """The engine without HTTP: (prompt_ids, max_tokens, stop) -> (text, output ids, finish reason)."""
    target = load_model(str(tiny_llama))
    engine = SpecEngine(target, InProcessDraftClient(build_drafter("ngram", target)), max_model_len=MAX_LEN)
    count = iter(range(10**6))

    def run(prompt_ids: list[int], max_tokens: int, stop: list[str] | None = None):
        seq = engine.run([Request(f"ref-{next(count)}", prompt_ids, max_tokens, num_draft_tokens=K,
                                  stop=stop or [])])[0]
        return engine.text(seq), seq.output_ids, seq.finish_reason.value

    run.tokenizer = target.tokenizer
    return run


def chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def raw(server, method: str, path: str, body: bytes | dict | None = None, key: str | None = KEY):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_idle(server, aborted_before: int) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while True:
        s = server.async_engine.stats()
        if s["running"] == 0 and s["waiting"] == 0 and s["aborted"] > aborted_before:
            return s
        assert time.monotonic() < deadline, f"sequence not aborted: {s}"
        time.sleep(0.02)


# --- happy paths ----------------------------------------------------------------------------------------------------


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert raw(server, "GET", "/health", key=None)[0] == 200


def test_completion_equals_engine(client, reference):
    ids = reference.tokenizer(PROMPT)["input_ids"]
    text, out, reason = reference(ids, 24)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(out))
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0)
    assert by_ids.choices[0].text == text


def test_completion_default_max_tokens_is_16(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_chat_equals_engine_and_defaults_to_the_context(client, reference):
    ids = chat_ids(reference.tokenizer, MESSAGES)
    text, out, reason = reference(ids, MAX_LEN - len(ids))
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(out))
    if reason == "length":  # no EOS: the default max_tokens filled the context exactly
        assert len(ids) + len(out) == MAX_LEN


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_stream_concatenates_to_the_non_streamed_text(client, chat):
    if chat:
        kw = dict(model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0)
        whole = client.chat.completions.create(**kw)
        chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[0].choices[0].delta.role == "assistant"
        expected = whole.choices[0].message.content
    else:
        kw = dict(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0)
        whole = client.completions.create(**kw)
        chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        expected = whole.choices[0].text
    assert text == expected
    assert len(chunks) > 3  # really incremental, not one blob
    with_choices = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in with_choices][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stream=True))
    assert all(c.choices and c.usage is None for c in chunks)


def test_stop_string_is_cut_and_never_streamed(client, reference):
    ids = reference.tokenizer(PROMPT)["input_ids"]
    full, _, _ = reference(ids, 40)
    clean = [i for i in range(4, len(full) - 3) if full[i:i + 3].isascii() and full[i:i + 3].isalnum()]
    assert clean, f"no usable stop string in {full!r}"
    stop = full[clean[0]:clean[0] + 3]
    expected = full[: full.index(stop)]
    assert reference(ids, 40, [stop])[0] == expected  # the engine agrees on where to cut
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop])
    r = client.completions.create(**kw)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    parts = [c.choices[0].text for c in client.completions.create(**kw, stream=True)]
    assert "".join(parts) == expected and stop not in "".join(parts)


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0.8, top_p=0.9, seed=7)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt=PROMPT * 3, max_tokens=24, temperature=0)
    status, body = raw(server, "GET", "/metrics", key=None)
    text = body.decode()
    assert status == 200

    def value(name: str) -> float:
        line = next(ln for ln in text.splitlines() if ln.startswith(name + "{") or ln.startswith(name + " "))
        return float(line.rsplit(" ", 1)[1])

    stats = server.async_engine.stats()
    assert value("vllm:spec_decode_num_drafts_total") == stats["num_drafts"] > 0
    assert value("vllm:spec_decode_num_draft_tokens_total") == stats["num_draft_tokens"]
    assert value("vllm:spec_decode_num_accepted_tokens_total") == stats["num_accepted_tokens"]
    assert value("vllm:num_requests_running") == 0 and value("vllm:num_requests_waiting") == 0
    assert value("vllm:time_to_first_token_seconds_count") > 0
    assert value("vllm:e2e_request_latency_seconds_count") > 0
    assert value("vllm:inter_token_latency_seconds_count") > 0


def test_concurrent_requests_are_batched(server, client):
    """More requests than KV slots (max_batch=4): all finish with exactly max_tokens; nothing is left behind."""
    def one(i: int):
        r = client.completions.create(model=MODEL, prompt=f"{i} + {i} = ", max_tokens=30 + i, temperature=0,
                                      extra_body={"ignore_eos": True})
        return r.usage.completion_tokens, r.choices[0].finish_reason

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    assert results == [(30 + i, "length") for i in range(6)]
    stats = server.async_engine.stats()
    assert stats["running"] == stats["waiting"] == 0 and not server.engine.sequences


# --- bad input: every case is an OpenAI-style error with the right status, never a 500 ---------------------------

C, CHAT = "/v1/completions", "/v1/chat/completions"
OK = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
BAD = [
    ("malformed json", C, b'{"model": "tiny-llama", "prompt": ', 400, None),
    ("body not an object", C, b"[1, 2]", 400, None),
    ("missing prompt", C, {"model": MODEL, "max_tokens": 4}, 400, "prompt"),
    ("missing messages", CHAT, {"model": MODEL}, 400, "messages"),
    ("empty messages", CHAT, {"model": MODEL, "messages": []}, 400, "messages"),
    ("temperature -1", C, OK | {"temperature": -1}, 400, "temperature"),
    ("temperature wrong type", C, OK | {"temperature": "hot"}, 400, "temperature"),
    ("top_p 0", C, OK | {"top_p": 0}, 400, "top_p"),
    ("top_p 1.5", C, OK | {"top_p": 1.5}, 400, "top_p"),
    ("top_k -2", C, OK | {"top_k": -2}, 400, "top_k"),
    ("max_tokens 0", C, OK | {"max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens over context", C, OK | {"max_tokens": MAX_LEN}, 400, "max_tokens"),
    ("prompt over context", C, OK | {"prompt": list(range(5, 5 + MAX_LEN))}, 400, "prompt"),
    ("token id out of vocab", C, OK | {"prompt": [1, 10**6]}, 400, None),
    ("two prompts", C, OK | {"prompt": ["a", "b"]}, 400, "prompt"),
    ("n=2", C, OK | {"n": 2}, 400, "n"),
    ("empty stop", C, OK | {"stop": [""]}, 400, "stop"),
    ("num_draft_tokens too big", C, OK | {"num_draft_tokens": 1000}, 400, None),
    ("unknown model", C, OK | {"model": "gpt-9"}, 404, "model"),
    ("unknown model (chat)", CHAT, {"model": "gpt-9", "messages": MESSAGES}, 404, "model"),
]


@pytest.mark.parametrize("name, path, body, status, param", BAD, ids=[b[0] for b in BAD])
def test_bad_input(server, name, path, body, status, param):
    got, data = raw(server, "POST", path, body)
    err = json.loads(data)["error"]
    assert got == status, err
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    if name == "max_tokens over context":
        assert str(MAX_LEN) in err["message"] and f"max_tokens is {MAX_LEN}" in err["message"]
        assert "prompt has" in err["message"]


def test_unknown_fields_are_ignored(server):
    status, data = raw(server, "POST", C, OK | {"user": "u", "presence_penalty": 0, "frequency_penalty": 0,
                                                "logit_bias": {}, "something_new": [1]})
    assert status == 200, data


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_api_key(server, key):
    for method, path, body in (("POST", C, OK), ("POST", CHAT, {"model": MODEL, "messages": MESSAGES}),
                               ("GET", "/v1/models", None)):
        status, data = raw(server, method, path, body, key=key)
        assert status == 401 and json.loads(data)["error"]["code"] == "invalid_api_key"


def test_openai_client_raises_typed_errors(server, client):
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_LEN)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT)
    bad = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", timeout=TIMEOUT, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_unknown_route_is_openai_shaped_404(server):
    status, data = raw(server, "GET", "/v1/nothing")
    assert status == 404 and "error" in json.loads(data)


# --- client disconnects -------------------------------------------------------------------------------------------


def test_stream_disconnect_aborts_the_sequence(server):
    before = server.async_engine.stats()["aborted"]
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_LEN - 64, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    conn.request("POST", C, body=body, headers={"Authorization": f"Bearer {KEY}",
                                                 "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read(6) == b"data: "  # the stream is running (http.client undoes the chunked encoding)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    stats = wait_idle(server, before)
    assert stats["running"] == 0 and not server.engine.sequences


def test_non_streamed_disconnect_aborts_the_sequence(server):
    before = server.async_engine.stats()["aborted"]
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_LEN - 64, "temperature": 0,
                       "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + TIMEOUT
        while server.async_engine.stats()["running"] == 0:  # wait until it is generating, then hang up
            assert time.monotonic() < deadline
            time.sleep(0.005)
    wait_idle(server, before)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_in_process_stops_cleanly_on_signal(tiny_llama, sig):
    """The real entry point in a subprocess: a signal while a stream is open lets the stream finish, then the
    process exits with code 0 after the engine thread has stopped."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cluster.local_serve", "--target", str(tiny_llama), "--draft",
                             "ngram", "--port", str(port), "--max-model-len", str(MAX_LEN)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO,
                            env=os.environ | {"PYTHONPATH": str(REPO)})
    try:
        stub = type("Stub", (), {"port": port})
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
            try:
                if raw(stub, "GET", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        conn.request("POST", C, body=json.dumps({"prompt": PROMPT, "max_tokens": MAX_LEN - 64, "stream": True,
                                                 "ignore_eos": True}), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read(6) == b"data: "
        proc.send_signal(sig)
        assert resp.read().endswith(b"data: [DONE]\n\n")  # graceful: the open stream is finished, not cut
        conn.close()
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
        assert "engine stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)


# --- incremental detokenisation -------------------------------------------------------------------------------------


def test_detokenizer_never_splits_a_multibyte_character(reference):
    tok = reference.tokenizer
    text = "naïve café 日本語 ✓ ok"
    ids = tok(text)["input_ids"]
    assert len(ids) > len(text.split())  # byte-level pieces: characters really are split across tokens
    detok = IncrementalDetokenizer(tok)
    parts = [detok.add([i], finished=(n == len(ids) - 1)) for n, i in enumerate(ids)]
    assert "".join(parts) == text and not any("\ufffd" in p for p in parts)


def test_detokenizer_holds_back_a_possible_stop_string(reference):
    tok = reference.tokenizer
    detok = IncrementalDetokenizer(tok, stop=["lazy dog"])
    assert detok.add(tok("over the la")["input_ids"]) == "over the "  # "la" may start "lazy dog"
    assert detok.add(tok("te")["input_ids"]) == "late"  # it did not


# --- an engine that fails: the HTTP layer answers with JSON, never a traceback ------------------------------------


class FailingEngine:
    """Engine-client stub: refuses one prompt, fails on another before output, and one mid-stream."""

    healthy = False

    async def generate(self, req: Request):
        if req.prompt_ids[0] == 1:
            raise ValueError("refused by the engine")
        if req.prompt_ids[0] == 2:
            raise RuntimeError("boom before output")
        yield GenerationDelta(req.seq_id, [req.prompt_ids[0]])
        raise RuntimeError("boom mid-stream")

    def stats(self) -> dict:
        return {}

    def check_health(self) -> None:
        raise RuntimeError("engine thread died")


def test_engine_failures_become_openai_errors(reference):
    app = build_app(FailingEngine(), MODEL, reference.tokenizer, max_model_len=MAX_LEN)
    with serving(app) as port:
        stub = type("Stub", (), {"port": port})
        status, data = raw(stub, "POST", C, OK | {"prompt": [1, 5]})
        assert status == 400 and json.loads(data)["error"]["message"] == "refused by the engine"
        status, data = raw(stub, "POST", C, OK | {"prompt": [2, 5]})
        assert status == 500 and json.loads(data)["error"] == {
            "message": "internal server error", "type": "internal_server_error", "param": None, "code": None}
        assert b"Traceback" not in data and b"boom" not in data
        status, data = raw(stub, "POST", C, OK | {"prompt": [3, 5], "stream": True})
        events = [e for e in data.decode().split("\n\n") if e]
        assert status == 200 and events[-1] == "data: [DONE]"
        assert json.loads(events[-2][len("data: "):])["error"]["type"] == "internal_server_error"
        status, data = raw(stub, "GET", "/health")
        assert status == 503 and "engine thread died" in json.loads(data)["error"]["message"]
        status, data = raw(stub, "GET", "/metrics")
        assert status == 200 and b"vllm:spec_decode_num_drafts_total" in data


def test_no_target_replica_is_a_503_with_retry_after(reference):
    """The router's pool with no healthy target (the app is starting, or every replica is gone): after a short wait
    for one, the client gets an OpenAI-shaped 503 with Retry-After, not a 500."""
    from router.target_pool import TargetPoolClient

    pool = TargetPoolClient(lambda: [], lambda: [], refresh_s=0.05, wait_for_replica_s=0.3)
    app = build_app(pool, MODEL, reference.tokenizer, max_model_len=MAX_LEN)
    with serving(app) as port:
        for body in (OK | {"prompt": [3, 5]}, OK | {"prompt": [3, 5], "stream": True}):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
            t = time.monotonic()
            conn.request("POST", C, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = json.loads(resp.read())
            conn.close()
            assert resp.status == 503 and resp.getheader("Retry-After") == "1", (resp.status, data)
            assert data["error"]["type"] == "service_unavailable" and "target replica" in data["error"]["message"]
            assert time.monotonic() - t >= 0.3  # it waited for a replica first


class _SlowEngine:
    """AsyncEngine stand-in behind a real target gRPC server: one token, then nothing until the call is cancelled;
    records which sequences were aborted (their generator closed)."""

    def __init__(self):
        self.aborted: list[str] = []
        self.engine = SimpleNamespace(max_model_len=MAX_LEN, max_draft_tokens=0, fallback_steps=0,
                                      runner=SimpleNamespace(vocab_size=10, cache=SimpleNamespace(num_slots=2)))

    def validate(self, req: Request) -> None:
        pass

    async def generate(self, req: Request):
        try:
            yield GenerationDelta(req.seq_id, [req.prompt_ids[0]])
            await asyncio.sleep(3600)
        finally:
            self.aborted.append(req.seq_id)

    def stats(self) -> dict:
        return dict(running=0, waiting=0, num_drafts=0, num_draft_tokens=0, num_accepted_tokens=0,
                    accepted_per_pos=[], prompt_tokens=0, completion_tokens=0, finished=0, aborted=0)

    def check_health(self) -> None:
        pass

    def at_capacity(self) -> bool:
        return False


def test_a_request_past_the_router_deadline_is_a_504_and_is_aborted_on_the_target(reference):
    """router.request_timeout_s: a request still generating when it passes gets a 504 (an in-band error event when
    the stream already started), never a 500, and the target replica aborts the sequence."""
    from router.target_pool import TargetPoolClient
    from workers.servers.target_server import TargetServer, TargetWorker

    engine = _SlowEngine()
    target = TargetServer(TargetWorker(engine, None, MODEL))
    pool = TargetPoolClient(lambda: [f"127.0.0.1:{target.port}"], lambda: [], refresh_s=0.05, request_timeout_s=0.5)
    app = build_app(pool, MODEL, reference.tokenizer, max_model_len=MAX_LEN)
    try:
        with serving(app) as port:
            stub = type("Stub", (), {"port": port})
            t = time.monotonic()
            status, data = raw(stub, "POST", C, OK | {"prompt": [3, 5]})
            assert status == 504, (status, data)
            err = json.loads(data)["error"]
            assert err["type"] == "timeout" and "router.request_timeout_s" in err["message"]
            assert 0.5 <= time.monotonic() - t < 10
            status, data = raw(stub, "POST", C, OK | {"prompt": [3, 5], "stream": True})
            events = [e for e in data.decode().split("\n\n") if e]
            assert status == 200 and events[-1] == "data: [DONE]"
            assert json.loads(events[0][len("data: "):])["choices"][0]["text"]  # the token before the deadline
            assert json.loads(events[-2][len("data: "):])["error"]["type"] == "timeout"
            deadline = time.monotonic() + TIMEOUT
            while len(engine.aborted) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(engine.aborted) == 2  # both sequences were freed on the target
    finally:
        target.stop()


def test_target_server_stops_within_its_grace_and_aborts_live_streams():
    """TargetServer.stop(grace) returns once the server is down (it used to wait out its whole timeout, every time,
    and log "did not stop cleanly"), and a stream still open is cancelled: its sequence is aborted in the engine."""
    from protos import specray_pb2 as pb
    from protos import specray_pb2_grpc as pb_grpc
    from workers.servers.target_server import TargetServer, TargetWorker
    from workers.wire import open_channel

    engine = _SlowEngine()
    target = TargetServer(TargetWorker(engine, None, MODEL))
    with open_channel(f"127.0.0.1:{target.port}", None) as ch:
        stub = pb_grpc.TargetServiceStub(ch)
        assert stub.Info(pb.InfoRequest(), timeout=5).model == MODEL
        t = time.monotonic()
        target.stop(grace=5.0)  # nothing in flight: no reason to wait for the grace
        assert time.monotonic() - t < 1.0

    engine = _SlowEngine()
    target = TargetServer(TargetWorker(engine, None, MODEL))
    with open_channel(f"127.0.0.1:{target.port}", None) as ch:
        call = pb_grpc.TargetServiceStub(ch).Generate(pb.GenerateRequest(seq_id="live", prompt_ids=[3, 5],
                                                                          max_tokens=8), timeout=30)
        assert list(next(call).token_ids) == [3]  # the stream is live on the server
        t = time.monotonic()
        target.stop(grace=0.5)
        assert time.monotonic() - t < 3.0
        assert engine.aborted == ["live"]
        with pytest.raises(grpc.RpcError):
            next(call)
