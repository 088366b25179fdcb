"""Where a remote draft block's time goes, eagle k=7, fp16w, batch 1, no run-ahead (SmolLM2-135M, 6 held-out chat
prompts, 64 tokens, target 1 thread, draft worker in its own process, 1 thread): the drafter's propose time in process
and in the worker, the verdict -> next block latency the target sees, and its parts (wall clock, both processes on
one machine), median over the blocks. `python pipeline-hop-breakdown.py` writes pipeline-hop-breakdown.json here."""
import json, sys, time, statistics, torch, os
import bench.pipeline as bp
bp._SERVER = bp._SERVER.replace('print("ready", flush=True)', '''
import atexit, signal, statistics as st, json as js
_p = drafter.propose
T = []
EV = []
import workers.servers.draft_server as ds
_ov = ds.DraftWorker._on_verdict
def ov(self, session, m):
    EV.append(("verdict", time.time())); return _ov(self, session, m)
ds.DraftWorker._on_verdict = ov
_sb = ds.DraftWorker._send_block
def sb(self, st, block):
    EV.append(("send", time.time())); return _sb(self, st, block)
ds.DraftWorker._send_block = sb
def timed(reqs):
    EV.append(("p0", time.time()))
    t = time.perf_counter(); r = _p(reqs); T.append(time.perf_counter() - t); EV.append(("p1", time.time())); return r
drafter.propose = timed
def dump(*a):
    s = sorted(T); open("/tmp/worker_propose.json", "w").write(js.dumps({"n": len(s), "p50": s[len(s)//2]*1e3, "p90": s[int(.9*(len(s)-1))]*1e3})); open("/tmp/worker_ev.json","w").write(js.dumps(EV))
    os._exit(0)
import os
signal.signal(signal.SIGTERM, dump)
print("ready", flush=True)''')
from workers.drafters.registry import build_drafter
from workers.engine.draft_client import InProcessDraftClient
from workers.engine.prompting import encode_prompt
from workers.engine.remote_draft import RemoteDraftClient
from workers.models.loader import load_model
torch.set_num_threads(1)
rows = [json.loads(l) for l in open("workers/drafters/checkpoints/smollm2-135m/heldout-chat.jsonl")][:6]
target = load_model("smollm2-135m", "fp16w")
prompts = [encode_prompt(target.tokenizer, r["prompt"], chat=True) for r in rows]
ip = InProcessDraftClient(build_drafter("eagle", target, dtype="fp16w", max_batch=1))
P = []
_pp = ip.drafter.propose
def tp(reqs):
    t = time.perf_counter(); r = _pp(reqs); P.append(time.perf_counter() - t); return r
ip.drafter.propose = tp
s1 = bp._Setup(target, ip, 7, 64)
import workers.servers.draft_server as _x
proc, port = bp._start_worker("eagle", "smollm2-135m", "fp16w", 1, 1, 0)
CE = []
_cv = RemoteDraftClient.verdict
def cv_(self, *a, **k):
    CE.append(("v", time.time())); return _cv(self, *a, **k)
RemoteDraftClient.verdict = cv_
_cb = RemoteDraftClient._on_block
def cb_(self, b):
    CE.append(("b", time.time())); return _cb(self, b)
RemoteDraftClient._on_block = cb_
c = RemoteDraftClient(f"127.0.0.1:{port}", k=7, connect_timeout_s=60)
s2 = bp._Setup(target, c, 7, 64)
for s in (s1, s2): s.run(-1, prompts[0], record=False)
P.clear(); c.rpc_latencies.clear()
for i, ids in enumerate(prompts):
    for s in (s1, s2): s.run(i, ids)
proc.terminate(); proc.wait()
p = sorted(P); l = sorted(c.rpc_latencies)
out = {"in_process_propose_ms": {"p50": round(p[len(p)//2]*1e3, 2), "p90": round(p[int(.9*(len(p)-1))]*1e3, 2)},
       "worker_propose_ms": {k: round(v, 2) for k, v in json.loads(open("/tmp/worker_propose.json").read()).items() if k != "n"},
       "verdict_to_next_block_ms": {"p50": round(l[len(l)//2]*1e3, 2), "p90": round(l[int(.9*(len(l)-1))]*1e3, 2)},
       "tokens_per_s": {"in_process": s1.summary()["tokens_per_s"], "remote_ahead1": s2.summary()["tokens_per_s"]}}

EV = json.loads(open("/tmp/worker_ev.json").read())
import bisect
wt = {k: [t for n, t in EV if n == k] for k in ("verdict", "p0", "p1", "send")}
cv = [t for n, t in CE if n == "v"]; cb = [t for n, t in CE if n == "b"]
def nxt(arr, t):
    i = bisect.bisect_left(arr, t); return arr[i] if i < len(arr) else None
d = {"v->worker": [], "worker->p0": [], "p0->p1": [], "p1->send": [], "send->client": []}
for t in cv[-140:]:
    a = nxt(wt["verdict"], t); b = a and nxt(wt["p0"], a); c_ = b and nxt(wt["p1"], b); e = c_ and nxt(wt["send"], c_); f = e and nxt(cb, e)
    if None in (a, b, c_, e, f): continue
    d["v->worker"].append(a - t); d["worker->p0"].append(b - a); d["p0->p1"].append(c_ - b); d["p1->send"].append(e - c_); d["send->client"].append(f - e)
out["parts_p50_ms"] = {k: round(statistics.median(v) * 1e3, 3) for k, v in d.items()}
from pathlib import Path
Path(__file__).with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
print(json.dumps(out))
