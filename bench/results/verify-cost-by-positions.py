"""Target forward time by number of new positions (chain vs token tree), SmolLM2-135M, 2 threads, batch 1,
250-token context; median of 15. `python verify-cost-by-positions.py [DTYPE]` (default bf16) writes
verify-cost-by-positions.json beside this file (-DTYPE.json for another dtype)."""
import json
import sys
import time
from pathlib import Path

import torch

from workers.models.loader import load_model

torch.set_num_threads(2)
DTYPE = sys.argv[1] if len(sys.argv) > 1 else "bf16"
model = load_model("smollm2-135m", dtype=DTYPE).model
cache = model.new_cache(1, 1024)


def median_ms(f, n=15):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return round(sorted(ts)[n // 2] * 1000, 1)


with torch.inference_mode():
    model(torch.randint(0, 1000, (1, 250)), cache, [0])
    ctx = cache.lengths[0]

    def forward(T, tree):
        parents = None
        if tree:  # two branches from the pending token
            parents = torch.arange(-1, T - 1)[None].clone()
            parents[0, T // 2] = 0
        model(torch.randint(0, 1000, (1, T)), cache, [0], tree=parents)
        cache.rollback(0, ctx)

    out = {"model": "smollm2-135m", "dtype": DTYPE, "threads": 2, "context": ctx, "forward_ms": {}}
    for T in [1, 4, 8, 12, 16, 24, 32]:
        out["forward_ms"][T] = {"chain": median_ms(lambda: forward(T, False)),
                                "tree": median_ms(lambda: forward(T, True)) if T > 2 else None}
suffix = ".json" if DTYPE == "bf16" else f"-{DTYPE}.json"
Path(__file__).with_name(Path(__file__).stem + suffix).write_text(json.dumps(out, indent=2) + "\n")
print(json.dumps(out))
