"""One target forward by number of new positions, bf16 vs fp16w vs fp32 side by side (interleaved per position
count, median of 31), SmolLM2-135M, batch 1, 250-token context, 2 threads; records which of bf16's CPU features
this machine has. `python forward-cost-by-dtype.py` writes forward-cost-by-dtype.json beside this file."""
import json
import time
from pathlib import Path

import torch

from workers.models.loader import load_model, resolve_dtype

torch.set_num_threads(2)
flags = set(Path("/proc/cpuinfo").read_text().split())
out = {"model": "smollm2-135m", "threads": 2, "context": 250, "auto": resolve_dtype("auto", "cpu"),
       "cpu_flags": {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")}, "forward_ms": {}}
models = {d: load_model("smollm2-135m", d).model for d in ("bf16", "fp16w", "fp32")}


def median_ms(f, n=31):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return round(sorted(ts)[n // 2] * 1000, 1)


with torch.inference_mode():
    caches = {}
    for d, m in models.items():
        caches[d] = m.new_cache(1, 1024)
        m(torch.randint(0, 1000, (1, 250)), caches[d], [0])
    for T in (1, 2, 4, 6, 8, 12, 16, 32):
        row = out["forward_ms"][T] = {}
        for d, m in models.items():
            cache, ctx = caches[d], caches[d].lengths[0]

            def forward():
                m(torch.randint(0, 1000, (1, T)), cache, [0])
                cache.rollback(0, ctx)
            forward()
            row[d] = median_ms(forward)
        row["bf16_vs_1_position"] = round(row["bf16"] / out["forward_ms"][1]["bf16"], 2)
        row["fp16w_vs_1_position"] = round(row["fp16w"] / out["forward_ms"][1]["fp16w"], 2)
Path(__file__).with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
print(json.dumps(out))
