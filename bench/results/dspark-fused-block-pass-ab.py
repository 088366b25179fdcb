"""A/B in one process: dspark's fused context+block head pass (new) vs the former two passes (old), same prompts,
interleaved per prompt; greedy bf16 batch 1, k=7, 1 thread."""
import json, sys, time, torch
torch.set_num_threads(1)
from workers.models.loader import load_model
from workers.drafters.registry import build_drafter
from workers.drafters.learned import LearnedDrafter
from workers.engine.engine import SpecEngine
from workers.engine.draft_client import InProcessDraftClient
from workers.engine.sequence import Request
from workers.engine.prompting import encode_prompt

def old_block_outputs(self, contexts, states, anchors, total):
    self._update_context(contexts, states, anchors)
    head, R, K = self.head, len(states), max(total)
    o = [st.anchor_out[None] for st in states]
    if K > 1:
        x = head.mask_embed[: K - 1].unsqueeze(0).expand(R, K - 1, -1)
        y = head.cached(x.contiguous(), self.cache, [st.slot for st in states], [t - 1 for t in total])
        o = [torch.cat([o[j], y[j, : total[j] - 1]]) for j in range(R)]
    return torch.stack([torch.nn.functional.pad(v, (0, 0, 0, K - v.shape[0])) for v in o])

lm = load_model("smollm2-135m", "bf16")
rows = [json.loads(l) for l in open("workers/drafters/checkpoints/smollm2-135m/heldout-chat.jsonl")][: int(sys.argv[1])]
new = build_drafter("dspark", lm, dtype="bf16", max_batch=1)
old = build_drafter("dspark", lm, dtype="bf16", max_batch=1)
old._block_outputs = old_block_outputs.__get__(old, LearnedDrafter)
res = {"new": [0, 0.0, 0, []], "old": [0, 0.0, 0, []]}  # tokens, seconds, steps, outputs
for i, r in enumerate(rows):
    ids = encode_prompt(lm.tokenizer, r["prompt"], True)
    for name, d in ((("new", new), ("old", old)) if i % 2 == 0 else (("old", old), ("new", new))):
        eng = SpecEngine(lm, InProcessDraftClient(d), max_batch=1)
        t = time.perf_counter()
        (s,) = eng.run([Request(f"{name}{i}", ids, 128, num_draft_tokens=7)])
        res[name][1] += time.perf_counter() - t
        res[name][0] += len(s.output_ids); res[name][2] += s.num_steps; res[name][3].append(s.output_ids)
out = {k: {"tokens": v[0], "tokens_per_s": round(v[0] / v[1], 3), "tau": round(v[0] / v[2], 3)} for k, v in res.items()}
out["new_vs_old_tokens_per_s"] = round(out["new"]["tokens_per_s"] / out["old"]["tokens_per_s"], 3)
out["identical_outputs"] = sum(a == b for a, b in zip(res["new"][3], res["old"][3]))
out["prompts"] = len(rows)
print(json.dumps(out, indent=1))
