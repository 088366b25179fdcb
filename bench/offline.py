"""Offline benchmark at batch size 1 (Spec-Bench style): every mode on the same prompts, in one run.

Modes are our engine with each drafter (`none` = target only, `ngram`, `model:PATH`, ...) and, as peers on the same
target, dtype and threads, transformers' own `generate` (`hf_generate`) and its prompt-lookup assisted generation
(`hf_assisted`). Prompts run in prompt-major order (every mode on prompt 1, then every mode on prompt 2, ...) so
machine noise lands on all modes alike; each mode is warmed up once first. Greedy decoding throughout.

Speedups are ratios within this run: our drafters against our `none`, `hf_assisted` against `hf_generate`, and
`hf_generate` against our `none`. One JSONL record per (mode, prompt) can be written with `records`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from workers.drafters.registry import build_drafter
from workers.engine.draft_client import InProcessDraftClient
from workers.engine.engine import SpecEngine
from workers.engine.prompting import encode_prompt
from workers.engine.sequence import Request
from workers.models.loader import load_model

PEERS = ("hf_generate", "hf_assisted")


@dataclass
class ModeStats:
    tokens: int = 0
    wall_s: float = 0.0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)

    def add(self, tokens: list[int], wall: float, drafts=0, draft_tokens=0, accepted=0, per_pos=()):
        self.tokens += len(tokens)
        self.wall_s += wall
        self.num_drafts += drafts
        self.num_draft_tokens += draft_tokens
        self.num_accepted_tokens += accepted
        for i, a in enumerate(per_pos):
            if i >= len(self.accepted_per_pos):
                self.accepted_per_pos.append(0)
            self.accepted_per_pos[i] += a
        self.outputs.append(tokens)


class _OurMode:
    def __init__(self, target, spec: str, k: int, max_model_len: int):
        drafter = build_drafter(spec, target, dtype=target.model.dtype, max_batch=1, max_model_len=max_model_len)
        client = InProcessDraftClient(drafter) if drafter is not None else None
        self.engine = SpecEngine(target, client, max_batch=1, max_model_len=max_model_len)
        self.k = k if drafter is not None else 0
        self.n = 0

    def run(self, ids: list[int], max_tokens: int):
        self.n += 1
        req = Request(f"bench-{self.n}", ids, max_tokens=max_tokens, num_draft_tokens=self.k)
        t = time.perf_counter()
        (seq,) = self.engine.run([req])
        wall = time.perf_counter() - t
        return seq.output_ids, wall, (seq.num_drafts, seq.num_draft_tokens, seq.num_accepted_tokens,
                                      seq.accepted_per_pos)


class _HFMode:
    def __init__(self, hf_model, eos: list[int], assisted_k: int | None):
        self.model = hf_model
        self.eos = eos
        self.assisted_k = assisted_k

    @torch.inference_mode()
    def run(self, ids: list[int], max_tokens: int):
        inp = torch.tensor([ids])
        kw = dict(max_new_tokens=max_tokens, do_sample=False, eos_token_id=self.eos, pad_token_id=self.eos[0],
                  attention_mask=torch.ones_like(inp))
        if self.assisted_k:
            kw["prompt_lookup_num_tokens"] = self.assisted_k
        t = time.perf_counter()
        out = self.model.generate(inp, **kw)
        wall = time.perf_counter() - t
        return out[0, len(ids):].tolist(), wall, (0, 0, 0, [])


def run_offline(
    target: str,
    drafts: list[str],
    prompts: list[dict],
    max_tokens: int,
    peers: list[str] = (),
    k: int = 4,
    dtype: str = "bf16",
    chat: bool = False,
    threads: int | None = None,
    max_model_len: int = 4096,
    records: str | None = None,
) -> dict:
    if threads:
        torch.set_num_threads(threads)
    for p in peers:
        if p not in PEERS:
            raise ValueError(f"unknown peer {p!r}; choose from {', '.join(PEERS)}")
    lm = load_model(target, dtype)
    modes: dict[str, object] = {}
    for spec in drafts:
        modes[spec] = _OurMode(lm, spec, k, max_model_len)
    if peers:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(lm.path, dtype=lm.model.dtype).eval()
        for p in peers:
            modes[p] = _HFMode(hf, lm.eos_token_ids, k if p == "hf_assisted" else None)
    encoded = [encode_prompt(lm.tokenizer, row["prompt"], chat) for row in prompts]
    warm = encoded[0][: min(len(encoded[0]), 32)]
    for m in modes.values():  # warm-up: first-call allocations and kernel selection stay out of the timings
        m.run(warm, 8)

    stats = {name: ModeStats() for name in modes}
    rec_file = open(records, "w") if records else None
    try:
        for row, ids in tqdm(list(zip(prompts, encoded)), desc="bench offline", unit="prompt"):
            for name, m in modes.items():
                toks, wall, (d, dt, acc, per_pos) = m.run(ids, max_tokens)
                stats[name].add(toks, wall, d, dt, acc, per_pos)
                if rec_file:
                    rec_file.write(json.dumps({"mode": name, "id": row["id"], "num_tokens": len(toks),
                                               "wall_s": wall, "num_drafts": d, "num_draft_tokens": dt,
                                               "num_accepted_tokens": acc, "accepted_per_pos": per_pos,
                                               "token_ids": toks}) + "\n")
    finally:
        if rec_file:
            rec_file.close()
    return summarize(stats, target=target, dtype=dtype, threads=torch.get_num_threads(), k=k,
                     max_tokens=max_tokens, num_prompts=len(prompts))


def summarize(stats: dict[str, ModeStats], **meta) -> dict:
    tps = {n: s.tokens / s.wall_s if s.wall_s else 0.0 for n, s in stats.items()}
    ref = stats.get("none")
    out = {**meta, "modes": {}}
    for name, s in stats.items():
        base = "hf_generate" if name == "hf_assisted" and "hf_generate" in tps else "none"
        row = {
            "tokens_per_s": round(tps[name], 2),
            "speedup": round(tps[name] / tps[base], 3) if tps.get(base) else None,
            "speedup_vs": base if base in tps else None,
            "tokens": s.tokens,
            "wall_s": round(s.wall_s, 3),
        }
        if s.num_drafts:
            row.update(tau=round(1 + s.num_accepted_tokens / s.num_drafts, 3), num_drafts=s.num_drafts,
                       num_draft_tokens=s.num_draft_tokens, num_accepted_tokens=s.num_accepted_tokens,
                       accepted_per_pos=[round(a / s.num_drafts, 3) for a in s.accepted_per_pos])
        elif name not in PEERS:
            row.update(tau=1.0)
        if ref is not None and name != "none":
            same = [a == b for a, b in zip(s.outputs, ref.outputs)]
            row["identical_to_none"] = round(sum(same) / len(same), 3) if same else None
        out["modes"][name] = row
    return out
