"""fp16w (fp16 weights packed for fbgemm, fp32 math) against fp32, SmolLM2-135M on this CPU, side by side in one run:
target forward time by number of new positions (250-token context, median of 15, 1 and 2 threads), and target-only
greedy decoding of the held-out chat prompts (prompt-major, 128 tokens): tokens/s and how far each fp16w answer
agrees with the fp32 one. `python fp16w-vs-fp32.py [N_PROMPTS]` writes fp16w-vs-fp32.json beside this file."""
import json
import sys
import time
from pathlib import Path

import torch

from workers.engine.engine import SpecEngine
from workers.engine.prompting import encode_prompt
from workers.engine.sequence import Request
from workers.models.loader import load_model

N = int(sys.argv[1]) if len(sys.argv) > 1 else 12
models = {d: load_model("smollm2-135m", d) for d in ("fp32", "fp16w")}
out = {"model": "smollm2-135m", "context": 250, "forward_ms": {}, "decode": {}}


def median_ms(f, n=15):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return round(sorted(ts)[n // 2] * 1000, 1)


with torch.inference_mode():
    for threads in (1, 2):
        torch.set_num_threads(threads)
        row = out["forward_ms"][f"{threads}_threads"] = {}
        caches = {}
        for d, lm in models.items():
            caches[d] = lm.model.new_cache(1, 1024)
            lm.model(torch.randint(0, 1000, (1, 250)), caches[d], [0])
        for T in (1, 2, 4, 8, 16):
            row[T] = {}
            for d, lm in models.items():
                cache, ctx = caches[d], caches[d].lengths[0]

                def forward():
                    lm.model(torch.randint(0, 1000, (1, T)), cache, [0])
                    cache.rollback(0, ctx)
                row[T][d] = median_ms(forward)
            row[T]["fp16w_speedup"] = round(row[T]["fp32"] / row[T]["fp16w"], 2)

torch.set_num_threads(2)
rows = [json.loads(line) for line in open("workers/drafters/checkpoints/smollm2-135m/heldout-chat.jsonl")][:N]
engines = {d: SpecEngine(lm, None, max_batch=1, max_model_len=2048) for d, lm in models.items()}
stats = {d: {"tokens": 0, "s": 0.0} for d in models}
agree, same = [], 0
for i, r in enumerate(rows):
    ids = encode_prompt(models["fp32"].tokenizer, r["prompt"], chat=True)
    outs = {}
    for d, eng in engines.items():
        t = time.perf_counter()
        (seq,) = eng.run([Request(f"{d}-{i}", ids, max_tokens=128, ignore_eos=True)])
        stats[d]["s"] += time.perf_counter() - t
        stats[d]["tokens"] += len(seq.output_ids)
        outs[d] = seq.output_ids
    a, b = outs["fp32"], outs["fp16w"]
    n = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    agree.append(n)
    same += a == b
out["decode"] = {d: round(s["tokens"] / s["s"], 2) for d, s in stats.items()}
out["decode"]["fp16w_speedup"] = round(out["decode"]["fp16w"] / out["decode"]["fp32"], 3)
out["greedy_agreement"] = {"prompts": len(rows), "identical_answers": same,
                           "tokens_before_first_difference": agree}
Path(__file__).with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
print(json.dumps(out))
