"""Serve one model with speculative decoding from a single process: no Ray, no gRPC.

    uvicorn (event loop, main thread)          engine thread
    router.api app  --generate()-->  AsyncEngine  -->  SpecEngine(target, InProcessDraftClient(drafter))

This is the path behind `make serve` on a laptop and the reference the cluster deployment is compared with: the
same router app and the same engine loop, wired together in process. The router gets its own tokenizer instance
because Hugging Face fast tokenizers must not be used from two threads at once (the engine thread decodes for stop
strings).

Shutdown: SIGINT / SIGTERM make uvicorn stop accepting connections and let open streams finish for a few seconds;
then the engine thread is stopped and `serve_in_process` returns.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass

import torch

from cluster.config import DEFAULT_MAX_QUEUED
from workers.drafters.registry import build_drafter
from workers.engine.async_engine import AsyncEngine
from workers.engine.draft_client import InProcessDraftClient
from workers.engine.engine import SpecEngine
from workers.models.loader import LoadedModel, load_model

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"  # loopback by default: exposing the port is an explicit choice
DEFAULT_PORT = 8000
GRACEFUL_SHUTDOWN_S = 5


@dataclass
class LocalStack:
    """Everything `serve_in_process` builds, for callers (tests, benches) that run the server themselves."""

    target: LoadedModel
    engine: SpecEngine
    async_engine: AsyncEngine
    app: object  # fastapi.FastAPI


def build_stack(target: str, draft: str = "none", k: int = 4, dtype: str = "fp32", max_batch: int = 8,
                api_key: str | None = None, max_model_len: int | None = None,
                model_name: str | None = None, min_confidence: float | None = None,
                max_queued: int | None = DEFAULT_MAX_QUEUED, tree_width: int = 1) -> LocalStack:
    """Load the target, build the drafter, the engine, its thread and the HTTP app (nothing is listening yet)."""
    from transformers import AutoTokenizer

    from router.api import build_app

    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    loaded = load_model(target, dtype)
    limit = min(max_model_len or 4096, loaded.model.args.max_position_embeddings)
    drafter = build_drafter(draft, loaded, dtype, max_batch=max_batch, max_model_len=limit,
                            min_confidence=min_confidence, tree_width=tree_width)
    engine = SpecEngine(loaded, InProcessDraftClient(drafter) if drafter else None, max_batch=max_batch,
                        max_model_len=limit, max_draft_tokens=max(16, k))
    async_engine = AsyncEngine(engine, max_queued=max_queued)
    try:
        router_tokenizer = AutoTokenizer.from_pretrained(loaded.path)
        app = build_app(async_engine, model_name or target, router_tokenizer, api_key,
                        max_model_len=engine.max_model_len, default_num_draft_tokens=k)
    except BaseException:
        async_engine.shutdown()
        raise
    log.info("serving %s (draft %s, k=%d, max_batch=%d, max_model_len=%d)", target, draft, k, max_batch,
             engine.max_model_len)
    return LocalStack(loaded, engine, async_engine, app)


def serve_in_process(target: str, draft: str = "none", k: int = 4, dtype: str = "fp32", host: str = DEFAULT_HOST,
                     port: int = DEFAULT_PORT, max_batch: int = 8, api_key: str | None = None,
                     threads: int | None = None, max_model_len: int | None = None,
                     model_name: str | None = None, min_confidence: float | None = None,
                     max_queued: int | None = DEFAULT_MAX_QUEUED, tree_width: int = 1) -> None:
    """Run the OpenAI-compatible server until SIGINT/SIGTERM; returns after the engine thread has stopped."""
    import uvicorn

    if threads:
        torch.set_num_threads(threads)
    stack = build_stack(target, draft, k, dtype, max_batch, api_key, max_model_len, model_name, min_confidence,
                        max_queued, tree_width)
    server = uvicorn.Server(uvicorn.Config(stack.app, host=host, port=port, log_level="info",
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    # uvicorn catches SIGINT/SIGTERM while it runs, restores the previous handlers afterwards and re-raises the
    # signal. With the defaults that re-raise would kill the process (SIGTERM) or throw KeyboardInterrupt past our
    # clean-up, so the previous handlers are no-ops for the duration and the signal has done its job by then.
    in_main = threading.current_thread() is threading.main_thread()  # signals only reach the main thread
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        server.run()
    finally:
        stack.async_engine.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("engine stopped")


def _ignore(signum, frame) -> None:
    pass


def main(argv: list[str] | None = None) -> None:
    """`python -m cluster.local_serve --target smollm2-135m --draft ngram` (the CLI proper lives in cluster.cli)."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--draft", default="none")
    p.add_argument("-k", type=int, default=4)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--api-key", default=os.environ.get("SPECRAY_API_KEY"),
                   help="require Authorization: Bearer KEY (default: $SPECRAY_API_KEY; unset = no auth)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--served-model-name", default=None, help="the `model` clients send (default: --target)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve_in_process(a.target, a.draft, a.k, a.dtype, a.host, a.port, a.max_batch, a.api_key, a.threads,
                     a.max_model_len, a.served_model_name)


if __name__ == "__main__":
    main()
