"""`specray train`: train a learned drafter (mtp1, eagle, dspark) for a target, with online target features.

(`--drafter model` distils a small LM instead: `training/distill.py`.)

    specray train --target smollm2-135m --drafter dspark --data data/ --out ckpt/dspark

Data is what `specray data` wrote (`train.jsonl` and `heldout.jsonl`: prompt and answer token ids, the answers
being the target's own). Sequences are bucketed by length into batches of about `--batch-tokens` tokens; each
step runs the frozen target over the batch for its features, then the drafter objective
(`training/objective.py`). Progress is a tqdm bar; every `--eval-every` steps the held-out split is scored (top-1
agreement per position and the greedy acceptance length a block would get) and a checkpoint is written: the
shippable files (`config.json`, `model.safetensors`, `training_args.json`) at the top of `--out`, optimizer and
position in `--out/state/` for `--resume`. Seeds are fixed; the same command on the same data gives the same
drafter on the same machine.

Data parallel: launched under `torchrun --nproc-per-node N` (gloo on CPU, NCCL on GPU) each rank takes every N-th
batch and DDP averages gradients; `--ray-workers N` does the same on a Ray cluster through Ray Train.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from training.features import FeatureCache, FeatureExtractor
from training.objective import DraftObjective
from workers.drafters.head import KINDS, DraftHead, HeadConfig
from workers.drafters.learned import save_head

log = logging.getLogger(__name__)

DEFAULTS = {  # per kind: layers of the head, its MLP width, block, which target layers it reads
    "mtp1": dict(num_layers=1, intermediate_size=1536, block_size=1, features="last"),
    "eagle": dict(num_layers=1, intermediate_size=1536, block_size=7, features="low,mid,high"),
    "dspark": dict(num_layers=2, intermediate_size=1024, block_size=7, features="low,mid,high"),
}


def feature_layers(spec: str, num_layers: int) -> list[int]:
    """'low,mid,high' (EAGLE-3's three depths), 'last', or explicit indices '2,14,27'."""
    named = {"low": min(2, num_layers - 1), "mid": num_layers // 2, "high": max(num_layers - 3, 0),
             "last": num_layers - 1}
    out = []
    for part in spec.split(","):
        part = part.strip()
        if part in named:
            out.append(named[part])
        else:
            try:
                out.append(int(part))
            except ValueError:
                raise ValueError(f"feature layer {part!r}: use low, mid, high, last or a layer index") from None
        if not 0 <= out[-1] < num_layers:
            raise ValueError(f"feature layer {out[-1]} is outside the target's {num_layers} layers")
    return out


def read_rows(path: Path, max_len: int, eos: int | None = None) -> list[tuple[list[int], int]]:
    """(prompt + answer ids truncated to max_len, prompt length) per row with at least 3 answer tokens. Answers
    that ended on EOS (`finish == "stop"`) get it back, so the drafter learns where the target stops."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            tail = [eos] if eos is not None and r.get("finish") == "stop" else []
            ids = (list(r["prompt_ids"]) + list(r["answer_ids"]) + tail)[:max_len]
            if len(ids) - len(r["prompt_ids"]) >= 3:
                rows.append((ids, len(r["prompt_ids"])))
    return rows


def make_batches(rows, batch_tokens: int, seed: int) -> list[list[int]]:
    """Indices of rows, bucketed by length so padding stays small; batch order shuffled with the seed."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    batches, cur, cur_max = [], [], 0
    for i in order:
        n = len(rows[i][0])
        if cur and max(cur_max, n) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, n)
    if cur:
        batches.append(cur)
    random.Random(seed).shuffle(batches)
    return batches


def collate(rows, idx: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = max(len(rows[i][0]) for i in idx)
    tokens = torch.zeros(len(idx), T, dtype=torch.long)
    for r, i in enumerate(idx):
        tokens[r, : len(rows[i][0])] = torch.tensor(rows[i][0])
    lengths = torch.tensor([len(rows[i][0]) for i in idx])
    prompt_lens = torch.tensor([rows[i][1] for i in idx])
    return tokens.to(device), lengths.to(device), prompt_lens.to(device)


def draft_vocabulary(rows, size: int, vocab_size: int) -> torch.Tensor:
    """The `size` tokens the target writes most often in its answers (all tokens when size is 0)."""
    if size <= 0 or size >= vocab_size:
        return torch.arange(vocab_size)
    counts = Counter()
    for ids, p in rows:
        counts.update(ids[p:])
    top = [t for t, _ in counts.most_common(size)]
    chosen = set(top)
    rest = (t for t in range(vocab_size) if t not in chosen)
    while len(top) < size:  # fewer distinct tokens than asked: pad with low ids so the size is what was asked
        top.append(next(rest))
    return torch.tensor(sorted(top))


def build_head(args, target, rows, kind: str) -> DraftHead:
    a = target.args
    d = DEFAULTS[kind]
    cfg = HeadConfig(
        kind=kind, hidden_size=a.hidden_size, vocab_size=a.vocab_size,
        feature_layers=feature_layers(args.feature_layers or d["features"], a.num_layers),
        num_layers=args.head_layers or d["num_layers"], num_heads=a.num_heads, num_kv_heads=a.num_kv_heads,
        head_dim=a.head_dim, intermediate_size=args.intermediate_size or d["intermediate_size"],
        block_size=1 if kind == "mtp1" else (args.block_size or d["block_size"]), draft_vocab_size=min(args.draft_vocab, a.vocab_size),
        rms_norm_eps=a.rms_norm_eps, target=args.target,
    )
    head = DraftHead(cfg)
    head.set_draft_vocab(draft_vocabulary(rows, cfg.draft_vocab_size, a.vocab_size))
    if not a.gemma_norm:  # start from the target's own final norm in front of its LM head
        head.norm.weight.data.copy_(target.norm.weight.detach().float())
    return head


def init_checkpoint(spec: str, kind: str, target_name: str, several: bool) -> Path:
    """Where `--init` points for `kind`: `shipped` (the drafter shipped for the target), or a directory holding the
    checkpoint itself (one kind) or one subdirectory per kind (several, as `--out` writes them)."""
    from workers.drafters.learned import shipped_checkpoint

    if spec == "shipped":
        path = shipped_checkpoint(kind, target_name)
        if path is None:
            raise ValueError(f"--init shipped: no {kind} drafter is shipped for {target_name}; pass a checkpoint "
                             "directory written by `specray train`")
        return path
    path = Path(spec) / kind if several or not (Path(spec) / "config.json").is_file() else Path(spec)
    if not (path / "config.json").is_file():
        raise ValueError(f"--init {spec}: no {kind} checkpoint at {path} (expected config.json and model.safetensors)")
    return path


def initial_head(args, target, rows, kind: str, target_name: str, several: bool) -> DraftHead:
    """A new head (`build_head`), or with `--init` a trained one to continue from: its architecture and draft
    vocabulary are the checkpoint's, so architecture flags are ignored."""
    if not args.init:
        return build_head(args, target, rows, kind)
    from workers.drafters.learned import load_head

    path = init_checkpoint(args.init, kind, target_name, several)
    head = load_head(path)
    a = target.args
    if head.cfg.kind != kind:
        raise ValueError(f"--init: {path} holds a checkpoint of kind {head.cfg.kind}, not {kind}")
    if (head.cfg.hidden_size, head.cfg.vocab_size) != (a.hidden_size, a.vocab_size) or \
            max(head.cfg.feature_layers) >= a.num_layers:
        raise ValueError(f"--init: {path} was trained for another target (d={head.cfg.hidden_size}, vocab="
                         f"{head.cfg.vocab_size}, layers {head.cfg.feature_layers}); this one has d={a.hidden_size}, "
                         f"vocab={a.vocab_size}, {a.num_layers} layers")
    log.info("%s: starting from %s", kind, path)
    return head.float()


def _ray_worker() -> bool:
    try:
        from ray import train as ray_train

        return ray_train.get_context().get_world_size() > 0
    except Exception:
        return False


def _setup_distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():  # Ray Train set it up
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return dist.get_rank(), world
    return 0, 1


class _Trainee:
    """One drafter being trained: its head, objective (DDP-wrapped when distributed), optimizer and checkpoints."""

    def __init__(self, args, kind: str, out: Path, target, rows, device, world: int, union: list[int],
                 target_name: str, several: bool):
        self.kind, self.out = kind, out
        self.state_path = out / "state" / "trainer_state.pt"
        self.head = initial_head(args, target, rows, kind, target_name, several)
        self.resume = None
        if args.resume and self.state_path.is_file():  # --resume wins over --init: the run has begun already
            self.resume = torch.load(self.state_path, map_location="cpu", weights_only=False)
            self.head.set_draft_vocab(self.resume["head"]["draft_vocab"])
            self.head.load_state_dict(self.resume["head"])
        self.head.to(device).train()
        self.head.attach(target)
        self.objective = DraftObjective(self.head, anchors_per_seq=args.anchors, decay=args.decay,
                                        tv_weight=args.tv_weight).to(device)
        self.model = self.objective
        if world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[device.index] if device.type == "cuda" else None)
        self.params = [p for p in self.head.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
        if self.resume is not None:
            self.opt.load_state_dict(self.resume["optimizer"])
        d = target.args.hidden_size
        # columns of the shared feature tensor this drafter reads, in its own layer order
        self.columns = torch.cat([torch.arange(union.index(x) * d, (union.index(x) + 1) * d)
                                  for x in self.head.cfg.feature_layers]).to(device)
        self.n_params = sum(p.numel() for p in self.head.parameters())
        self.history: list[dict] = []
        self.last_stats: dict = {}

    def features(self, feats: torch.Tensor) -> torch.Tensor:
        return feats.index_select(-1, self.columns)

    def save(self, meta: dict, step: int, elapsed: float) -> None:
        save_head(self.head, self.out, dict(meta, drafter=self.kind, steps=step, elapsed_s=round(elapsed, 1),
                                           params=self.n_params, eval=self.history[-1] if self.history else None))
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"head": self.head.state_dict(), "optimizer": self.opt.state_dict(), "step": step,
                    "elapsed_s": elapsed, "rng": torch.get_rng_state()}, self.state_path)


def train(args) -> dict:
    """Train every drafter in `args.drafter` (a comma list) on the same batches: the target's forward pass, the
    expensive part on a CPU, is shared by all of them. One kind writes to --out; several to --out/KIND."""
    from workers.models.loader import load_model, resolve_dtype

    kinds = [k.strip() for k in str(args.drafter).split(",") if k.strip()]
    if kinds == ["model"]:
        from training.distill import distill

        if getattr(args, "init", ""):
            raise ValueError("--init continues a trained mtp1/eagle/dspark head; a model drafter starts from "
                             "--student PATH")

        return distill(args)
    if "model" in kinds:
        raise ValueError("--drafter model trains a whole small LM and runs on its own; train it separately from "
                         f"{', '.join(k for k in kinds if k != 'model') or 'the heads'}")
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"--drafter: expected one or more of {', '.join(KINDS)} (comma separated), or model, got "
                         f"{args.drafter!r}")
    rank, world = _setup_distributed()
    device = torch.device(args.device if args.device != "cuda" or world == 1 else f"cuda:{torch.cuda.current_device()}")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    data = Path(args.data)
    if not (data / "train.jsonl").is_file():
        raise ValueError(f"{data} has no train.jsonl; make one with `specray data --out {data}`")
    tdtype = resolve_dtype(args.target_dtype, device, inference=False)
    lm = load_model(args.target, tdtype, device=str(device))
    target = lm.model.eval()
    eos = lm.eos_token_ids[0] if lm.eos_token_ids else None
    rows = read_rows(data / "train.jsonl", args.max_len, eos)
    held = read_rows(data / "heldout.jsonl", args.max_len, eos) if (data / "heldout.jsonl").is_file() else []
    if not rows:
        raise ValueError(f"{data}/train.jsonl has no usable rows (each needs at least 3 answer tokens)")
    for p in target.parameters():
        p.requires_grad_(False)

    out = Path(args.out)
    union: list[int] = []
    for kind in kinds:
        if args.init:  # the checkpoint's own layers
            path = init_checkpoint(args.init, kind, lm.name, len(kinds) > 1)
            layers = json.loads((path / "config.json").read_text())["feature_layers"]
        else:
            layers = feature_layers(args.feature_layers or DEFAULTS[kind]["features"], target.args.num_layers)
        for layer in layers:
            if layer not in union:
                union.append(layer)
    trainees = [_Trainee(args, kind, out if len(kinds) == 1 else out / kind, target, rows, device, world, union,
                         lm.name, len(kinds) > 1) for kind in kinds]
    extractor = FeatureExtractor(target, union)
    batches = make_batches(rows, args.batch_tokens, args.seed)
    steps_per_epoch = max(len(batches) // world, 1)
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    warmup = min(args.warmup, total_steps // 10 + 1)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(total_steps - warmup, 1)
        if args.time_budget_min:  # a time budget ends training early: decay on whichever comes first
            frac = max(frac, (time.time() - t0) / (args.time_budget_min * 60))
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    step, elapsed_before = 0, 0.0
    first = trainees[0].resume
    if first is not None:
        step, elapsed_before = first["step"], first.get("elapsed_s", 0.0)
        torch.set_rng_state(first["rng"])
    cache = None
    if args.feature_cache:
        cache = FeatureCache(args.feature_cache, extractor, sum(len(r[0]) for r in rows))
    amp = args.amp if args.amp is not None else tdtype == "bf16"  # bf16 autocast (AMX on CPUs that have it)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    train_args = {k: v for k, v in vars(args).items() if k != "func"}
    t0 = time.time() - elapsed_before
    bar = tqdm(total=total_steps, initial=step, desc=f"train {','.join(kinds)}", dynamic_ncols=True,
               disable=rank != 0 or not args.progress)

    def logp_for(tr: _Trainee):
        return lambda h: extractor.target_log_probs(h, tr.head.draft_vocab)

    def evaluate() -> None:
        g = torch.Generator(device=device)
        agg = [dict() for _ in trainees]
        n = 0
        with torch.no_grad():
            for idx in make_batches(held, args.batch_tokens, 0)[: args.eval_batches]:
                tokens, lengths, plens = collate(held, idx, device)
                feats, last = extractor(tokens, lengths.tolist())
                n += 1
                for tr, a in zip(trainees, agg):
                    tr.head.eval()
                    g.manual_seed(1234 + n)
                    with autocast:
                        s = tr.objective(tokens, lengths, plens, tr.features(feats), last, logp_for(tr), generator=g)
                    for key in ("loss", "acc0", "sim_tau"):
                        a[key] = a.get(key, 0.0) + float(s[key])
                    if "acc_per_pos" in s:
                        a["acc_per_pos"] = a.get("acc_per_pos", 0) + s["acc_per_pos"].float().cpu()
                    tr.head.train()
        if not n:
            return
        for tr, a in zip(trainees, agg):
            res = {k: [round(x / n, 4) for x in v.tolist()] if torch.is_tensor(v) else round(v / n, 4)
                   for k, v in a.items()}
            tr.history.append(dict(res, step=step, elapsed_s=round(time.time() - t0, 1)))
            if rank == 0:
                tqdm.write(json.dumps({"eval": tr.kind, **tr.history[-1]}))

    def save() -> None:
        if rank == 0:
            for tr in trainees:
                tr.save(train_args, step, time.time() - t0)

    epoch = step // steps_per_epoch
    start_step = step
    stop = False
    while step < total_steps and not stop:
        # every rank takes the same number of batches (every world-th, wrapping around when there are fewer
        # batches than ranks), or DDP's gradient all-reduce would wait forever
        every = make_batches(rows, args.batch_tokens, args.seed + epoch)
        order = [every[(rank + world * i) % len(every)] for i in range(steps_per_epoch)]
        for bi in range(step % steps_per_epoch, len(order)):
            idx = order[bi]
            tokens, lengths, plens = collate(rows, idx, device)
            if cache is not None:  # the target runs in its own dtype, outside autocast
                feats, last = cache.get(idx[0], tokens, lengths.tolist())
            else:
                feats, last = extractor(tokens, lengths.tolist())
            for tr in trainees:
                for grp in tr.opt.param_groups:
                    grp["lr"] = lr_at(step)
                with autocast:
                    s = tr.model(tokens, lengths, plens, tr.features(feats), last, logp_for(tr))
                tr.opt.zero_grad(set_to_none=True)
                s["loss"].backward()
                torch.nn.utils.clip_grad_norm_(tr.params, 1.0)
                tr.opt.step()
                tr.last_stats = {"loss": float(s["loss"].detach()), "tau": float(s["sim_tau"])}
            step += 1
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix({f"{tr.kind}_tau": f"{tr.last_stats['tau']:.2f}" for tr in trainees})
            out_of_time = bool(args.time_budget_min and time.time() - t0 > args.time_budget_min * 60) or (
                args.stop_after > 0 and step - start_step >= args.stop_after)
            if step % args.eval_every == 0 or step >= total_steps or out_of_time:
                evaluate()
                save()
            if step >= total_steps or out_of_time:
                stop = True
                break
        epoch += 1
    bar.close()
    if world > 1 and os.environ.get("WORLD_SIZE") and not _ray_worker():
        dist.destroy_process_group()  # torchrun's group is ours to close; Ray Train closes its own
    results = []
    for tr in trainees:
        f = tr.out / "model.safetensors"
        results.append({"drafter": tr.kind, "steps": step, "train_s": round(time.time() - t0, 1), "params": tr.n_params,
                        "checkpoint_bytes": f.stat().st_size if f.exists() else 0, "out": str(tr.out),
                        "eval": tr.history[-1] if tr.history else None})
    return results[0] if len(results) == 1 else {"drafters": results}


def run_train(args) -> int:
    if args.ray_workers:
        from training.ray_train import train_on_ray

        result = train_on_ray(args)
    else:
        result = train(args)
    print(json.dumps(result))
    return 0


def add_train_parser(sub) -> None:
    from workers.models.loader import DTYPE_HELP

    p = sub.add_parser("train", help="train a drafter (mtp1, eagle, dspark heads, or a distilled small LM: model) "
                                      "on data from `specray data`")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--drafter", required=True,
                   help="mtp1, eagle, dspark, or several comma separated (trained together on shared target "
                        "features, each into --out/KIND); or model (distil a small LM, served as model:OUT)")
    p.add_argument("--student", default="", help="model: the LM to distil into (default: the target cut down to "
                                                 "--student-layers layers)")
    p.add_argument("--student-layers", type=int, default=4, help="model: layers kept from the target (default 4)")
    p.add_argument("--data", required=True, help="directory written by `specray data`")
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--target-dtype", default="auto", choices=["auto", "bf16", "fp32"], help=DTYPE_HELP)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: --epochs)")
    p.add_argument("--time-budget-min", type=float, default=0, help="stop (and save) after this many minutes")
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per batch, padding included")
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--anchors", type=int, default=16, help="blocks per sequence per step (eagle, dspark)")
    p.add_argument("--decay", type=float, default=0.8, help="loss weight decay with block position")
    p.add_argument("--tv-weight", type=float, default=1.0, help="dspark: total variation to the target")
    p.add_argument("--draft-vocab", type=int, default=8192, help="LM head rows the drafter may propose (0: all)")
    p.add_argument("--block-size", type=int, default=0)
    p.add_argument("--head-layers", type=int, default=0)
    p.add_argument("--intermediate-size", type=int, default=0)
    p.add_argument("--feature-layers", default="", help="e.g. low,mid,high (default) or 2,15,27")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--feature-cache", default="", help="keep target features in safetensors shards here")
    p.add_argument("--resume", action="store_true", help="continue from --out/state/trainer_state.pt")
    p.add_argument("--init", default="", metavar="DIR|shipped",
                   help="start from trained weights (fine-tune): a checkpoint directory (one per kind, as --out "
                        "writes them, for several kinds) or `shipped`, the drafters shipped for --target; the "
                        "architecture and draft vocabulary are the checkpoint's")
    p.add_argument("--stop-after", type=int, default=0,
                   help="checkpoint and stop after this many steps of this run (continue later with --resume)")
    p.add_argument("--ray-workers", type=int, default=0, help="data-parallel workers on a Ray cluster (Ray Train)")
    p.add_argument("--amp", dest="amp", action="store_true", default=None,
                   help="bf16 autocast for the drafter (default: on when the target runs in bf16)")
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run_train)


def main(argv=None) -> int:
    """`python -m training.train ARGS` (what torchrun launches) = `specray train ARGS`."""
    parser = argparse.ArgumentParser(prog="specray")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(argv or [])])
    return args.func(args)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
