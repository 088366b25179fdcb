"""The `specray` command line: generate, bench, serve.

    specray generate --target NAME|PATH [--draft none|ngram|model:PATH|KIND:PATH] [--k N] [--temperature T]
                     [--top-p P] [--top-k K] [--seed S] [--max-tokens N] [--dtype auto|fp32|bf16]
                     (--prompt TEXT | --prompts FILE.jsonl) [--chat] [--json OUT.jsonl]
    specray bench offline --target ... --drafts none,ngram[,...] [--peers hf_generate,hf_assisted]
                     --prompts FILE --max-tokens N [--dtype] [--chat] --json OUT.json
    specray serve [--target ...] [--draft ...] [--port P] [--dtype ...]

User errors (a bad flag value, a missing model, a malformed prompt file) print one clear line and exit 2; they
never end in a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

DEFAULT_TARGET = "smollm2-135m"


def _add_setup_comparison_args(p: argparse.ArgumentParser, draft: str, k: int) -> None:
    """What the benches comparing in-process and disaggregated setups share."""
    from workers.models.loader import DTYPE_HELP

    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--draft", default=draft)
    p.add_argument("--k", type=int, default=k)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16", "fp16w"], help=DTYPE_HELP)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the target in every setup")
    p.add_argument("--prompts", required=True)
    p.add_argument("--limit", type=int, default=None)


def _add_model_args(p: argparse.ArgumentParser, draft_default: str = "none") -> None:
    from workers.models.loader import DTYPE_HELP

    p.add_argument("--target", default=DEFAULT_TARGET, help="model name, .gguf file, HF directory or cached HF id")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16", "fp16w"], help=DTYPE_HELP)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--max-model-len", type=int, default=4096, help="context length served (<= the model's)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=128)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specray", description="Speculative decoding on a cluster.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text in-process with speculative decoding")
    _add_model_args(g)
    _add_sampling_args(g)
    g.add_argument("--draft", default="ngram", help="none | ngram[:N] | model:PATH | KIND:PATH (default: ngram)")
    g.add_argument("--k", type=int, default=4, help="draft tokens verified per step")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help='JSONL file of {"id": str, "prompt": str} rows')
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (continuous batching)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--json", dest="json_out", help="write one JSON row per prompt to this file")

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    off = bsub.add_parser("offline", help="batch-1 speed of every drafter and peer on the same prompts")
    _add_model_args(off)
    off.add_argument("--drafts", default="none,ngram", help="comma list of draft specs (none = target only)")
    off.add_argument("--peers", default="", help="comma list: hf_generate,hf_assisted")
    off.add_argument("--k", type=int, default=4)
    off.add_argument("--prompts", required=True)
    off.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    off.add_argument("--max-tokens", type=int, default=128)
    off.add_argument("--chat", action="store_true")
    off.add_argument("--records", help="also write one JSONL record per (mode, prompt)")
    off.add_argument("--json", dest="json_out", required=True)

    sv = bsub.add_parser("serve", help="closed-loop concurrency sweep against an OpenAI-compatible endpoint")
    sv.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    sv.add_argument("--prompts", required=True)
    sv.add_argument("--concurrency", default="1,2,4,8")
    sv.add_argument("--max-tokens", type=int, default=128)
    sv.add_argument("--requests-per-level", type=int, default=None)
    sv.add_argument("--chat", action="store_true")
    sv.add_argument("--model", default=None)
    sv.add_argument("--api-key", default=os.environ.get("SPECRAY_API_KEY"))
    sv.add_argument("--slo", type=float, default=None, help="per-user tokens/s target for throughput_at_slo")
    sv.add_argument("--records", help="one JSONL row per request")
    sv.add_argument("--json", dest="json_out", required=True)

    dg = bsub.add_parser("disagg", help="in-process vs disaggregated (with and without run-ahead), one run")
    _add_setup_comparison_args(dg, draft="ngram", k=4)
    dg.add_argument("--concurrency", default="1,2,4,8")
    dg.add_argument("--requests-per-level", type=int, default=None)
    dg.add_argument("--max-tokens", type=int, default=128)
    dg.add_argument("--no-chat", action="store_true")
    dg.add_argument("--setups", default="in_process,disagg_no_runahead,disagg_runahead")
    dg.add_argument("--json", dest="json_out", required=True)

    pl = bsub.add_parser("pipeline", help="the draft/target pipeline alone, batch 1: in-process vs a gRPC draft "
                                          "worker in its own process, without and with run-ahead (no Ray, no HTTP)")
    _add_setup_comparison_args(pl, draft="eagle", k=7)
    pl.add_argument("--tree-width", type=int, default=1,
                    help="also compare the drafter drafting trees this wide (in-process: verified as trees; the "
                         "draft worker: blocks prepared for their branches)")
    pl.add_argument("--hypotheses", type=int, default=6,
                    help="blocks the draft worker prepares per block for the verdicts it expects")
    pl.add_argument("--max-tokens", type=int, default=64)
    pl.add_argument("--no-chat", action="store_true")
    pl.add_argument("--json", dest="json_out", required=True)

    rt = bsub.add_parser("draft-rtt", help="draft <-> target round trip per step on loopback (ngram, no models)")
    rt.add_argument("--steps", type=int, default=300)
    rt.add_argument("--tls", action="store_true", help="also over mutual TLS, side by side (throw-away certificates)")
    rt.add_argument("--json", dest="json_out", required=True)

    s = sub.add_parser("serve", help="serve the OpenAI-compatible API: router, target pool and draft pool on a "
                                     "local Ray (the embedded default)")
    s.add_argument("--config", help="YAML config (SpecrayConfig; deploy/serve.yaml's args also work)")
    s.add_argument("--target", default=None, help="target model (default: smollm2-135m)")
    s.add_argument("--dtype", default=None, choices=["auto", "fp32", "bf16", "fp16", "fp16w"],
                   help="target dtype (default: the config's, auto)")
    s.add_argument("--draft", default=None, help="drafter of the draft pool (default: ngram)")
    s.add_argument("--k", type=int, default=None, help="draft tokens verified per step")
    s.add_argument("--min-confidence", type=float, default=None,
                   help="eagle, dspark: end a draft where its predicted survival falls below this (0: full blocks)")
    s.add_argument("--tree-width", type=int, default=None,
                   help="mtp1, eagle, dspark: draft greedy token trees this wide (default 1: chains); with "
                        "--in-process the target verifies the trees, otherwise the draft pool prepares blocks for "
                        "their branches while the target verifies the first")
    s.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks per target replica")
    s.add_argument("--target-replicas", type=int, default=None)
    s.add_argument("--draft-replicas", type=int, default=None)
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--api-key", default=os.environ.get("SPECRAY_API_KEY"))
    s.add_argument("--threads", type=int, default=None, help="torch threads per target rank")
    s.add_argument("--max-batch", type=int, default=None)
    s.add_argument("--max-queued", type=int, default=None,
                   help="sequences a target replica queues behind --max-batch before it refuses more (503)")
    s.add_argument("--in-process", action="store_true",
                   help="no Ray: one process runs the router, the engine and the drafter")
    s.add_argument("--tls-dir", default=None,
                   help="mutual TLS between router, target and draft workers, with the ca.pem, node.pem and "
                        "node-key.pem of this directory (`specray tls-certs --out DIR` writes a test set)")

    from cluster.tls import add_tls_certs_parser

    add_tls_certs_parser(sub)

    # the draft-training toolkit (training/): each module registers its own subcommand
    from training.data import add_data_parser
    from training.eval import add_eval_parser
    from training.train import add_train_parser

    add_data_parser(sub)
    add_train_parser(sub)
    add_eval_parser(sub)
    return parser


def cmd_generate(args) -> int:
    import torch

    from bench.prompts import load_prompts
    from workers.drafters.registry import build_drafter
    from workers.engine.draft_client import InProcessDraftClient
    from workers.engine.engine import SpecEngine
    from workers.engine.prompting import encode_prompt
    from workers.engine.sequence import Request
    from workers.models.loader import load_model
    from workers.params import SamplingParams

    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    params.validate()
    rows = load_prompts(args.prompts) if args.prompts else [{"id": "prompt-0", "prompt": args.prompt}]
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.target, args.dtype)
    drafter = build_drafter(args.draft, lm, dtype=args.dtype, max_batch=args.max_batch,
                            max_model_len=args.max_model_len)
    engine = SpecEngine(lm, InProcessDraftClient(drafter) if drafter else None, max_batch=args.max_batch,
                        max_model_len=args.max_model_len)
    requests = []
    for i, row in enumerate(rows):
        ids = encode_prompt(lm.tokenizer, row["prompt"], args.chat)
        p = params if params.seed is None else SamplingParams(params.temperature, params.top_k, params.top_p,
                                                              params.seed + i)
        requests.append(Request(row["id"], ids, args.max_tokens, p, args.k if drafter else 0, stop=args.stop))
    for r in requests:
        engine.validate(r)
    t0 = time.perf_counter()
    seqs = engine.run(requests)
    out = open(args.json_out, "w") if args.json_out else None
    for row, seq in zip(rows, seqs):
        text = engine.text(seq)
        rec = {"id": row["id"], "prompt": row["prompt"], "text": text, "token_ids": seq.output_ids,
               "num_drafts": seq.num_drafts, "num_draft_tokens": seq.num_draft_tokens,
               "num_accepted_tokens": seq.num_accepted_tokens, "accepted_per_pos": seq.accepted_per_pos,
               "finish_reason": seq.finish_reason.value, "wall_s": round(seq.finish_s - seq.arrival_s, 4)}
        if out:
            out.write(json.dumps(rec) + "\n")
        else:
            print(text if len(rows) == 1 else json.dumps(rec))
    if out:
        out.close()
    n = sum(len(s.output_ids) for s in seqs)
    drafts = sum(s.num_drafts for s in seqs)
    acc = sum(s.num_accepted_tokens for s in seqs)
    wall = time.perf_counter() - t0
    print(f"[specray] {len(seqs)} prompt(s), {n} tokens in {wall:.2f}s ({n / wall:.1f} tok/s), "
          f"tau {1 + acc / drafts if drafts else 1.0:.2f}", file=sys.stderr)
    return 0


def cmd_bench_offline(args) -> int:
    from bench.offline import run_offline
    from bench.prompts import load_prompts

    rows = load_prompts(args.prompts)[: args.limit]
    result = run_offline(args.target, [d for d in args.drafts.split(",") if d],
                         rows, args.max_tokens, [p for p in args.peers.split(",") if p], k=args.k, dtype=args.dtype,
                         chat=args.chat, threads=args.threads, max_model_len=args.max_model_len,
                         records=args.records)
    with open(args.json_out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


def cmd_bench_serve(args) -> int:
    from bench.prompts import load_prompts
    from bench.serve import run_serve_bench

    result = run_serve_bench(args.url, load_prompts(args.prompts), _int_list(args.concurrency), args.max_tokens,
                             chat=args.chat, api_key=args.api_key, requests_per_level=args.requests_per_level,
                             model=args.model, slo_tokens_per_s=args.slo, records=args.records)
    return _emit(result, args.json_out)


def cmd_bench_disagg(args) -> int:
    from bench.disagg import run_comparison
    from bench.prompts import load_prompts

    result = run_comparison(args.target, args.draft, load_prompts(args.prompts)[: args.limit],
                            _int_list(args.concurrency), args.max_tokens, k=args.k, dtype=args.dtype,
                            chat=not args.no_chat, threads=args.threads, requests_per_level=args.requests_per_level,
                            setups=tuple(x for x in args.setups.split(",") if x))
    return _emit(result, args.json_out)


def cmd_bench_pipeline(args) -> int:
    from bench.pipeline import run_pipeline
    from bench.prompts import load_prompts

    result = run_pipeline(args.target, args.draft, load_prompts(args.prompts)[: args.limit], args.k, args.max_tokens,
                          dtype=args.dtype, threads=args.threads, chat=not args.no_chat, tree_width=args.tree_width,
                          hypotheses=args.hypotheses)
    return _emit(result, args.json_out)


def cmd_bench_draft_rtt(args) -> int:
    from bench.draft_rtt import run_draft_rtt_bench

    return _emit(run_draft_rtt_bench(args.steps, compare_tls=args.tls), args.json_out)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise ValueError(f"expected a comma list of integers, got {text!r}") from None


def _emit(result: dict, path: str) -> int:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


def serve_config(args):
    """The SpecrayConfig `specray serve` runs: --config (or the defaults) with the flags given on top."""
    from cluster.config import load_config

    cfg = load_config(args.config, {
        "target.model": args.target, "target.dtype": args.dtype, "draft.drafter": args.draft,
        "target.num_draft_tokens": args.k, "target.tp": args.tp, "target.num_replicas": args.target_replicas,
        "draft.num_replicas": args.draft_replicas, "router.host": args.host, "router.port": args.port,
        "router.api_key": args.api_key, "target.threads": args.threads, "target.max_batch": args.max_batch,
        "target.max_queued": args.max_queued, "draft.min_confidence": args.min_confidence,
        "draft.tree_width": args.tree_width,
    })
    if args.tls_dir:
        from cluster.config import TLSConfig
        from cluster.tls import tls_section

        cfg.tls = TLSConfig(**tls_section(args.tls_dir))
    return cfg


def cmd_serve(args) -> int:
    cfg = serve_config(args)
    if cfg.tls and args.in_process:
        raise ValueError("TLS secures the gRPC hops between Ray workers; --in-process has none (use --tls-dir "
                         "without --in-process)")
    cfg.grpc_tls()  # a missing or malformed file is a clear error here, not in a replica's log
    if args.in_process:
        from cluster.local_serve import serve_in_process

        t = cfg.target
        serve_in_process(target=t.model, draft=cfg.draft.drafter, k=t.num_draft_tokens, dtype=t.dtype,
                         host=cfg.router.host, port=cfg.router.port, max_batch=t.max_batch,
                         api_key=cfg.router.api_key, threads=t.threads, min_confidence=cfg.draft.min_confidence,
                         max_queued=t.max_queued, tree_width=cfg.draft.tree_width)
        return 0
    from cluster.launch import serve_forever
    from workers.models.loader import resolve

    resolve(cfg.target.model)  # fail fast with a clear message, and convert a GGUF once before Ray starts
    serve_forever(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="[specray] %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pydantic import ValidationError

    from workers.models.loader import ModelNotFound

    handlers = {"generate": cmd_generate, "serve": cmd_serve}
    if args.command != "serve" and getattr(args, "dtype", None) == "auto":  # serve: each replica resolves its own
        from workers.models.loader import resolve_dtype

        args.dtype = resolve_dtype("auto", getattr(args, "device", None) or "cpu")
    try:
        if args.command == "bench":
            return {"offline": cmd_bench_offline, "serve": cmd_bench_serve, "disagg": cmd_bench_disagg,
                    "pipeline": cmd_bench_pipeline, "draft-rtt": cmd_bench_draft_rtt}[args.bench](args)
        if args.command in handlers:
            return handlers[args.command](args)
        return args.func(args)
    except (ModelNotFound, ValueError, FileNotFoundError, ValidationError) as e:
        print(f"specray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
