"""Online benchmark, closed loop: a concurrency sweep against an OpenAI-compatible streaming endpoint.

For each concurrency level c, c workers send requests back to back (each starts its next request when the
previous one ends) until the level's request budget is spent: `requests_per_level`, by default max(2c, 8), so
every level sees at least two requests per worker. Prompts are used in order, cycling, and every level starts from
the first one, so levels see the same mix. Every request streams (`stream: true`,
`stream_options: {include_usage: true}`) and is measured on the client:

    TTFT     time to the first chunk carrying text (a chat stream's opening role-only chunk does not count)
    e2e      time to the end of the stream (`data: [DONE]`)
    n        output tokens: `usage.completion_tokens` from the final chunk; the number of text chunks if the
             server sends no usage (an undercount with speculative decoding, where one chunk can carry several
             tokens)
    TPOT     (e2e - TTFT) / (n - 1), for n > 1
    per-user tokens/s = 1 / TPOT: the speed one user sees

Per level: p50 and p90 of each, errors, and aggregate output tokens/s = tokens of the successful requests / the
level's wall time. **p90 is always the worse tail**: the 90th percentile of the times, and for per-user tokens/s
(where higher is better) the speed that 90% of requests reach, i.e. its 10th percentile. Throughput at an SLO
(`throughput_at_slo`, DSpark's headline metric) is the highest aggregate tokens/s among levels whose median and
p90 per-user tokens/s both meet the SLO.

A request fails (counted in `errors`, left out of every statistic) on a non-200 status, an in-band error event,
a stream that ends without `[DONE]` or without any text, or its timeout. Everything is bounded: the number of
requests per level, each request's total time (`timeout_s`) and the number of events read per stream. Requests go
to the given URL only (and once to its `/v1/models` when no model name is given); proxies from the environment are
not used.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import aiohttp

DEFAULT_TIMEOUT_S = 300.0
QUANTILES = (50, 90)
_CHAT_PATH = "/v1/chat/completions"
_COMPLETIONS_PATH = "/v1/completions"
_ERROR_EXAMPLES = 3


@dataclass
class RequestResult:
    """One request as the client saw it. Times in seconds from sending the request."""

    index: int
    prompt_id: str
    ok: bool
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    usage_reported: bool = False
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft_s is None or self.e2e_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def per_user_tokens_per_s(self) -> float | None:
        tpot = self.tpot_s
        return 1.0 / tpot if tpot else None  # a zero TPOT (all tokens in one chunk) has no meaningful speed


def percentiles(values, qs=QUANTILES, higher_is_better: bool = False) -> dict[str, float | None]:
    """{"p50": ..., "p90": ...} with linear interpolation between order statistics (numpy's default method).

    `pQ` is always the worse tail: the Q-th percentile for times (lower is better), the (100 - Q)-th for speeds
    (`higher_is_better=True`), so "p90 per-user tokens/s >= SLO" means 90% of requests were at least that fast.
    None for every key when there are no values.
    """
    xs = sorted(float(v) for v in values if v is not None)
    out: dict[str, float | None] = {}
    for q in qs:
        if not 0 <= q <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {q}")
        if not xs:
            out[f"p{q}"] = None
            continue
        rank = (100 - q if higher_is_better else q) / 100 * (len(xs) - 1)
        lo = int(rank)
        hi = min(lo + 1, len(xs) - 1)
        out[f"p{q}"] = xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)
    return out


def throughput_at_slo(levels: list[dict], slo_tokens_per_s: float) -> float | None:
    """Highest aggregate output tokens/s among levels whose median and p90 per-user tokens/s are >= the SLO
    (p90 = the speed 90% of requests reach); None if no level meets it."""
    best = None
    for level in levels:
        user = level.get("per_user_tokens_per_s") or {}
        p50, p90 = user.get("p50"), user.get("p90")
        if p50 is None or p90 is None or p50 < slo_tokens_per_s or p90 < slo_tokens_per_s:
            continue
        agg = level.get("aggregate_tokens_per_s")
        if agg is not None and (best is None or agg > best):
            best = agg
    return best


def endpoint_url(url: str, chat: bool) -> str:
    """The endpoint to call: `url` itself if it already names /v1/completions or /v1/chat/completions, else the
    base URL plus the one `chat` selects."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"url must be an http(s) URL, got {url!r}")
    base = url.rstrip("/")
    if base.endswith(_CHAT_PATH) or base.endswith(_COMPLETIONS_PATH):
        return base
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base + (_CHAT_PATH if chat else _COMPLETIONS_PATH)


def _models_url(endpoint: str) -> str:
    return endpoint[: endpoint.rindex("/v1/")] + "/v1/models"


def _request_body(model: str, prompt: str, max_tokens: int, chat: bool, temperature: float) -> dict:
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "stream": True,
                  "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def _chunk_text(choice: dict) -> str:
    if "text" in choice:  # /v1/completions
        return choice.get("text") or ""
    return (choice.get("delta") or {}).get("content") or ""  # /v1/chat/completions


async def _one_request(session: aiohttp.ClientSession, endpoint: str, body: dict, headers: dict,
                       timeout_s: float, max_events: int, index: int, prompt_id: str) -> RequestResult:
    res = RequestResult(index, prompt_id, ok=False)
    chunks, usage_tokens, done = 0, None, False
    t0 = time.perf_counter()
    try:
        async with session.post(endpoint, json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                detail = (await resp.content.read(512)).decode("utf-8", "replace").strip()
                res.error = f"HTTP {resp.status}: {detail}"
                return res
            events = 0
            async for raw in resp.content:  # one SSE line at a time
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, ": keep-alive" comments, event names
                events += 1
                if events > max_events:
                    res.error = f"more than {max_events} events in one stream"
                    return res
                data = line[len(b"data:"):].strip()
                if data == b"[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    err = event["error"]
                    res.error = "error event: " + (err.get("message", "") if isinstance(err, dict) else str(err))
                    return res
                if isinstance(event.get("usage"), dict):
                    usage_tokens = event["usage"].get("completion_tokens")
                if any(_chunk_text(c) for c in event.get("choices") or ()):
                    if res.ttft_s is None:
                        res.ttft_s = time.perf_counter() - t0
                    chunks += 1
            res.e2e_s = time.perf_counter() - t0
    except asyncio.TimeoutError:
        res.error = f"timed out after {timeout_s:g}s"
        return res
    except (aiohttp.ClientError, ValueError) as e:  # connection problems, malformed JSON in an event
        res.error = f"{type(e).__name__}: {e}"
        return res
    if not done:
        res.error = "stream ended without [DONE]"
    elif res.ttft_s is None:
        res.error = "stream carried no text"
    else:
        res.ok = True
        res.usage_reported = isinstance(usage_tokens, int) and usage_tokens > 0
        res.output_tokens = usage_tokens if res.usage_reported else chunks
    return res


def summarize_level(concurrency: int, results: list[RequestResult], wall_s: float) -> dict:
    """One level of the sweep as a JSON-ready dict (see the module docstring for the definitions)."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)

    def rounded(p: dict) -> dict:
        return {k: (round(v, 6) if v is not None else None) for k, v in p.items()}

    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "output_tokens": tokens,
        "wall_s": round(wall_s, 6),
        "aggregate_tokens_per_s": round(tokens / wall_s, 6) if wall_s > 0 else None,
        "ttft_s": rounded(percentiles(r.ttft_s for r in ok)),
        "tpot_s": rounded(percentiles(r.tpot_s for r in ok)),
        "per_user_tokens_per_s": rounded(percentiles((r.per_user_tokens_per_s for r in ok), higher_is_better=True)),
        "e2e_s": rounded(percentiles(r.e2e_s for r in ok)),
        "usage_reported": sum(r.usage_reported for r in ok),
        "error_examples": [r.error for r in results if not r.ok][:_ERROR_EXAMPLES],
    }


async def _resolve_model(session: aiohttp.ClientSession, endpoint: str, headers: dict, timeout_s: float) -> str:
    url = _models_url(endpoint)
    async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"GET {url}: HTTP {resp.status}; pass the model name explicitly")
        data = await resp.json()
    models = data.get("data") or []
    if not models:
        raise RuntimeError(f"GET {url} lists no models; pass the model name explicitly")
    return models[0]["id"]


async def _run_level(endpoint: str, model: str, prompts: list[dict], concurrency: int, num_requests: int,
                     max_tokens: int, chat: bool, headers: dict, timeout_s: float,
                     temperature: float) -> tuple[list[RequestResult], float]:
    max_events = 8 * max_tokens + 256  # a text chunk per token, plus role, usage, [DONE] and some slack
    results: list[RequestResult] = []
    next_index = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < num_requests:  # bounded: each pass takes one of the level's num_requests
            i = next_index
            next_index += 1
            row = prompts[i % len(prompts)]
            body = _request_body(model, row["prompt"], max_tokens, chat, temperature)
            results.append(await _one_request(session, endpoint, body, headers, timeout_s, max_events, i,
                                              str(row.get("id", i))))

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    results.sort(key=lambda r: r.index)
    return results, wall


async def arun_serve_bench(url: str, prompts: list[dict], concurrency: list[int], max_tokens: int,
                           chat: bool = False, api_key: str | None = None, requests_per_level: int | None = None,
                           timeout_s: float = DEFAULT_TIMEOUT_S, model: str | None = None,
                           temperature: float = 0.0, slo_tokens_per_s: float | None = None,
                           records: str | None = None) -> dict:
    """`run_serve_bench` for callers that already run an event loop."""
    if not prompts:
        raise ValueError("no prompts")
    if any("prompt" not in row for row in prompts):
        raise ValueError('every prompt row needs a "prompt" field')
    if not concurrency or any(int(c) < 1 for c in concurrency):
        raise ValueError(f"concurrency levels must be >= 1, got {concurrency}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if requests_per_level is not None and requests_per_level < 1:
        raise ValueError(f"requests_per_level must be >= 1, got {requests_per_level}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    endpoint = endpoint_url(url, chat)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if model is None:
        async with aiohttp.ClientSession(trust_env=False) as session:
            model = await _resolve_model(session, endpoint, headers, timeout_s)

    levels, rows = [], []
    for c in concurrency:
        c = int(c)
        n = requests_per_level or max(2 * c, 8)
        results, wall = await _run_level(endpoint, model, prompts, c, n, max_tokens, chat, headers, timeout_s,
                                         temperature)
        levels.append(summarize_level(c, results, wall))
        rows += [{"concurrency": c, **asdict(r), "tpot_s": r.tpot_s} for r in results]
    out = {"url": endpoint, "model": model, "chat": chat, "max_tokens": max_tokens, "levels": levels}
    if slo_tokens_per_s is not None:
        out["slo_tokens_per_s"] = slo_tokens_per_s
        out["throughput_at_slo"] = throughput_at_slo(levels, slo_tokens_per_s)
    if records:
        with open(records, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return out


def run_serve_bench(url: str, prompts: list[dict], concurrency: list[int], max_tokens: int, chat: bool = False,
                    api_key: str | None = None, requests_per_level: int | None = None,
                    timeout_s: float = DEFAULT_TIMEOUT_S, model: str | None = None, temperature: float = 0.0,
                    slo_tokens_per_s: float | None = None, records: str | None = None) -> dict:
    """Closed-loop concurrency sweep; returns `{"url", "model", "chat", "max_tokens", "levels": [...]}` (plus
    `slo_tokens_per_s` and `throughput_at_slo` when an SLO is given). `url` is the server's base URL (or the
    endpoint itself); `prompts` are rows with a "prompt" (and optionally "id"); `model` defaults to the first one
    the server lists; `records` writes one JSONL row per request."""
    return asyncio.run(arun_serve_bench(url, prompts, concurrency, max_tokens, chat, api_key, requests_per_level,
                                        timeout_s, model, temperature, slo_tokens_per_s, records))
