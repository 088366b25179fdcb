"""`specray eval`: how well drafters do for a target, at batch size 1, in one run.

    specray eval --target smollm2-135m --draft mtp1 --draft eagle --draft dspark --prompts P.jsonl --k 7 \
        --json eval.json --rows eval.jsonl --plot acceptance.png

Every drafter (and target-only decoding, the baseline the speedups are measured against) decodes every prompt
through the same engine the server runs, prompt-major so machine noise lands on all of them alike. Reported per
drafter: tokens/s and speedup, tau (tokens per verification step, bonus included), acceptance per position
(the fraction of steps whose i-th draft token was accepted), and for drafters with a confidence head the expected
calibration error (ECE, 10 bins) of the predicted per-position acceptance against what verification decided. One
JSONL row per (drafter, prompt) with `--rows`; `--plot` draws acceptance per position for all drafters side by
side (needs matplotlib: `pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from workers.drafters.registry import build_drafter, parse_draft_spec
from workers.engine.draft_client import InProcessDraftClient
from workers.engine.engine import SpecEngine
from workers.engine.prompting import encode_prompt
from workers.engine.sequence import Request
from workers.models.loader import DTYPE_HELP, load_model, resolve_dtype
from workers.params import SamplingParams


class RecordingClient(InProcessDraftClient):
    """Pairs each proposal's confidence with the verification outcome of the step it was used in."""

    def __init__(self, drafter):
        super().__init__(drafter)
        self.last: dict[str, list[float]] = {}
        self.pairs: list[tuple[float, int]] = []  # (predicted acceptance, accepted?) per verified position

    def drafts(self, requests):
        out = super().drafts(requests)
        for r, p in zip(requests, out):
            # a tree's confidences are per node, and which branch was judged is not known here: calibration is
            # measured on chains
            self.last[r.seq_id] = [] if p.is_tree else list(p.confidence or [])[: r.k]
        return out

    def verdict(self, seq_id, token_ids, num_new, feature_start, hidden) -> None:
        conf = self.last.pop(seq_id, None)
        if conf:
            accepted = num_new - 1
            for i, c in enumerate(conf[: accepted + 1]):  # positions past the first rejection were never judged
                self.pairs.append((c, int(i < accepted)))
        super().verdict(seq_id, token_ids, num_new, feature_start, hidden)


def expected_calibration_error(pairs: list[tuple[float, int]], bins: int = 10) -> float | None:
    if not pairs:
        return None
    conf = torch.tensor([p for p, _ in pairs])
    hit = torch.tensor([float(y) for _, y in pairs])
    idx = (conf * bins).long().clamp(max=bins - 1)
    err = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            err += float(m.float().mean()) * abs(float(conf[m].mean()) - float(hit[m].mean()))
    return err


def run_eval(target: str, drafts: list[str], prompts: list[dict], k: int, max_tokens: int, dtype: str = "auto",
             temperature: float = 0.0, chat: bool = True, rows_path: str | None = None, seed: int = 0,
             max_model_len: int = 4096, min_confidence: float | list[float | None] | None = None,
             threads: int | None = None, tree_width: int | list[int] = 1,
             progress: bool = True, device: str = "cpu") -> dict:
    if threads:
        torch.set_num_threads(threads)
    dtype = resolve_dtype(dtype, device)
    lm = load_model(target, dtype, device=device)
    bars = [min_confidence] if isinstance(min_confidence, (int, float)) or min_confidence is None \
        else list(min_confidence)
    engines, clients, specs = {}, {}, []
    widths = [tree_width] if isinstance(tree_width, int) else list(tree_width)
    for spec in ["none"] + [d for d in drafts if d != "none"]:
        spec, own_width = _split_tree(spec)
        spec, own = _split_bar(spec)
        if own is not None:  # KIND@P: this drafter at its own bar
            setups = [(f"{spec}@{own:g}", own)]
        elif parse_draft_spec(spec)[0] in ("eagle", "dspark") and len(bars) > 1:  # one setup per bar
            setups = [(f"{spec}@{bar:g}", bar) for bar in bars]
        else:
            setups = [(spec, bars[0])]
        learned = parse_draft_spec(spec)[0] in ("mtp1", "eagle", "dspark")
        tree_ws = [own_width] if own_width else widths if learned else [1]
        for (name, bar), w in [(s, w) for s in setups for w in tree_ws]:
            name = f"{name}+tree{w}" if w > 1 else name
            drafter = build_drafter(spec, lm, max_batch=1, max_model_len=max_model_len, min_confidence=bar,
                                    tree_width=w)
            clients[name] = RecordingClient(drafter) if drafter is not None else None
            engines[name] = SpecEngine(lm, clients[name], max_batch=1, max_model_len=max_model_len)
            specs.append(name)
    encoded = [encode_prompt(lm.tokenizer, row["prompt"], chat) for row in prompts]
    stats = {s: dict(tokens=0, wall=0.0, drafts=0, accepted=0, per_pos=[0] * k) for s in specs}
    n = 0

    def run_one(spec: str, ids: list[int], max_new: int):
        nonlocal n
        n += 1
        params = SamplingParams(temperature=temperature, seed=seed + n) if temperature > 0 else SamplingParams()
        req = Request(f"eval-{n}", list(ids), max_tokens=max_new, num_draft_tokens=k if spec != "none" else 0,
                      params=params)
        t = time.perf_counter()
        (seq,) = engines[spec].run([req])
        return seq, time.perf_counter() - t

    for spec in specs:  # warm-up: first-call allocations stay out of the timings
        run_one(spec, encoded[0][:32], 8)
        if clients[spec] is not None:
            clients[spec].pairs.clear()
    out_rows = open(rows_path, "w") if rows_path else None
    try:
        for row, ids in tqdm(list(zip(prompts, encoded)), desc="eval", unit="prompt", disable=not progress):
            for spec in specs:
                seq, wall = run_one(spec, ids, max_tokens)
                st = stats[spec]
                st["tokens"] += len(seq.output_ids)
                st["wall"] += wall
                st["drafts"] += seq.num_drafts
                st["accepted"] += seq.num_accepted_tokens
                for i, a in enumerate(seq.accepted_per_pos[:k]):
                    st["per_pos"][i] += a
                if out_rows:
                    out_rows.write(json.dumps({
                        "draft": spec, "id": row.get("id"), "num_tokens": len(seq.output_ids), "wall_s": wall,
                        "tokens_per_s": len(seq.output_ids) / wall if wall else None, "tau": seq.tau,
                        "num_drafts": seq.num_drafts, "num_accepted_tokens": seq.num_accepted_tokens,
                        "accepted_per_pos": seq.accepted_per_pos}) + "\n")
    finally:
        if out_rows:
            out_rows.close()
    base = stats["none"]["tokens"] / stats["none"]["wall"]
    result = {"target": target, "dtype": dtype, "device": str(device), "k": k, "temperature": temperature,
              "max_tokens": max_tokens, "num_prompts": len(prompts), "threads": torch.get_num_threads(), "drafters": {}}
    for spec in specs:
        st = stats[spec]
        tps = st["tokens"] / st["wall"]
        r = {"tokens_per_s": round(tps, 2), "speedup": round(tps / base, 3), "tokens": st["tokens"],
             "wall_s": round(st["wall"], 2)}
        if st["drafts"]:
            r["tau"] = round(1 + st["accepted"] / st["drafts"], 3)
            r["acceptance_per_pos"] = [round(a / st["drafts"], 3) for a in st["per_pos"]]
            r["num_drafts"] = st["drafts"]
        elif spec == "none":
            r["tau"] = 1.0
        c = clients[spec]
        if c is not None and c.pairs:
            r["calibration_ece"] = round(expected_calibration_error(c.pairs), 4)
            r["mean_confidence"] = round(sum(p for p, _ in c.pairs) / len(c.pairs), 4)
            r["judged_positions"] = len(c.pairs)
        result["drafters"][spec] = r
    return result


def plot_acceptance(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    rows = {n: r["acceptance_per_pos"] for n, r in result["drafters"].items() if "acceptance_per_pos" in r}
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(rows), 1)
    for j, (name, acc) in enumerate(rows.items()):
        xs = [i + 1 + (j - (len(rows) - 1) / 2) * width for i in range(len(acc))]
        ax.bar(xs, acc, width=width, label=f"{name} (tau {result['drafters'][name]['tau']})")
    ax.set_xlabel("draft position")
    ax.set_ylabel("fraction of steps accepted")
    ax.set_title(f"acceptance per position, {Path(str(result['target'])).name}, k={result['k']}")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_eval_cmd(args) -> int:
    from bench.prompts import load_prompts

    if args.k < 1:
        raise ValueError("--k must be at least 1")
    rows = load_prompts(args.prompts)[: args.limit]
    result = run_eval(args.target, args.draft, rows, args.k, args.max_tokens, dtype=args.dtype,
                      temperature=args.temperature, chat=not args.no_chat, rows_path=args.rows, seed=args.seed,
                      min_confidence=args.min_confidence, threads=args.threads, tree_width=args.tree_width,
                      device=args.device)
    text = json.dumps(result, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    if args.plot:
        plot_acceptance(result, args.plot)
    print(text)
    return 0


def _split_bar(spec: str) -> tuple[str, float | None]:
    """`eagle@0.3` -> ("eagle", 0.3): a drafter evaluated at its own survival bar."""
    head, sep, tail = spec.rpartition("@")
    if not sep:
        return spec, None
    try:
        bar = float(tail)
    except ValueError:
        return spec, None  # an @ that belongs to a path
    if not 0 <= bar <= 1:
        raise ValueError(f"{spec}: the survival bar after @ must be in [0, 1]")
    return head, bar


def _split_tree(spec: str) -> tuple[str, int | None]:
    """`dspark+tree3` -> ("dspark", 3): a learned drafter evaluated with its own tree width."""
    head, sep, tail = spec.rpartition("+tree")
    if not sep or not tail.isdigit():
        return spec, None
    return head, int(tail)


def _widths(text: str) -> list[int]:
    try:
        widths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        widths = []
    if not widths or not all(1 <= w <= 8 for w in widths):
        raise argparse.ArgumentTypeError(f"expected integers in [1, 8] separated by commas, got {text!r}")
    return widths


def _bars(text: str) -> list[float]:
    try:
        bars = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers in [0, 1] separated by commas, got {text!r}") from None
    if not bars or not all(0 <= b <= 1 for b in bars):
        raise argparse.ArgumentTypeError(f"expected numbers in [0, 1] separated by commas, got {text!r}")
    return bars


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="tau, acceptance per position, calibration and speed of drafters (batch 1)")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--draft", action="append", required=True,
                   help="KIND:PATH, a shipped KIND (mtp1, eagle, dspark), ngram or model:PATH; repeatable; "
                        "eagle and dspark take @P for their own survival bar (dspark@0.2), learned drafters "
                        "+treeW for their own tree width (dspark@0.3+tree3)")
    p.add_argument("--prompts", required=True, help="JSONL prompt file ({'id', 'prompt'} rows)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--k", type=int, default=7, help="draft tokens per step (mtp1 always drafts 1)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16w"], help=DTYPE_HELP)
    p.add_argument("--min-confidence", type=_bars, default=None, metavar="P[,P...]",
                   help="eagle, dspark: end a draft after the token where its predicted survival falls below P "
                        "(0: never; default: the drafter's own). Several values evaluate each drafter at each")
    p.add_argument("--tree-width", type=_widths, default=[1], metavar="W[,W...]",
                   help="learned drafters: draft greedy token trees with W first tokens (1: chains, the default); "
                        "several values evaluate each learned drafter at each. KIND+treeW sets one drafter's own")
    p.add_argument("--no-chat", action="store_true", help="feed prompts raw instead of through the chat template")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="torch device of the target and drafters: cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", help="write the summary here")
    p.add_argument("--rows", help="write one JSONL row per (drafter, prompt) here")
    p.add_argument("--plot", help="draw acceptance per position to this PNG")
    p.set_defaults(func=run_eval_cmd)
