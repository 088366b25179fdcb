"""`specray train --drafter model`: distil a small LM drafter from the target (DistillSpec, Zhou et al. 2310.08461).

    specray train --target smollm2-135m --drafter model --student-layers 4 --data data/ --out ckpt/model
    specray serve --draft model:ckpt/model

The student is an ordinary causal LM with the target's tokenizer, served by `ModelDrafter` like any other
`model:PATH` draft. It is either `--student PATH` (any model the loader reads that shares the target's vocabulary)
or, by default, the target cut down to `--student-layers` layers: evenly spaced layers of the target (first and
last included) with its embedding, final norm and LM head, which starts far closer to the target than a random
network (the layer-dropping initialisation of DistilBERT, Sanh et al. 1910.01108).

It learns the target's own distribution, not just its tokens: the loss is the forward KL from the target's
next-token distribution to the student's, over the full vocabulary, at every answer position of the target's
own answers (`specray data`). Acceptance of greedy drafts depends on top-1 agreement, which the held-out
evaluation reports. Checkpoints are loadable model directories (`config.json`, `model.safetensors`, the
tokenizer), so `--draft model:OUT` serves them directly; the optimizer state lives in `OUT/state/` for `--resume`.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from workers.models.config import ModelArgs
from workers.models.decoder import Decoder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


def spaced_layers(total: int, keep: int) -> list[int]:
    """`keep` evenly spaced layer indices out of `total`, first and last included."""
    if not 1 <= keep <= total:
        raise ValueError(f"--student-layers must be in [1, {total}] (the target has {total} layers), got {keep}")
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def student_config(target_path: Path, layers: list[int]) -> dict:
    """The target's config.json cut down to `layers` (per-layer lists such as `layer_types` follow)."""
    cfg = json.loads((target_path / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    total = text["num_hidden_layers"]
    text["num_hidden_layers"] = len(layers)
    for key, value in list(text.items()):
        if isinstance(value, list) and len(value) == total and key != "architectures":
            text[key] = [value[i] for i in layers]
    if "max_window_layers" in text:
        text["max_window_layers"] = min(text["max_window_layers"], len(layers))
    return cfg


def build_student(target: Decoder, target_path: Path, num_layers: int) -> tuple[Decoder, dict]:
    """The target cut down to `num_layers` evenly spaced layers, weights copied (fp32)."""
    from transformers import AutoConfig, PretrainedConfig

    layers = spaced_layers(target.args.num_layers, num_layers)
    cfg = student_config(target_path, layers)
    hf = AutoConfig.for_model(**cfg) if "model_type" in cfg else PretrainedConfig(**cfg)
    student = Decoder(ModelArgs.from_hf_config(hf))
    state = {}
    for k, v in target.state_dict().items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            if int(i) not in layers:
                continue
            k = f"layers.{layers.index(int(i))}.{rest}"
        state[k] = v.detach().float().clone()
    student.load_state_dict(state)
    cfg["specray_student"] = {"layers_from_target": layers}
    return student, cfg


def save_student(student: Decoder, cfg: dict, target_path: Path, out: Path, info: dict) -> None:
    """A model directory the loader (and transformers) reads: config, bf16 weights, the target's tokenizer."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {f"model.{k}": v.detach().to(torch.bfloat16).contiguous() for k, v in student.state_dict().items()
             if not k.startswith("lm_head.")}
    if student.lm_head is not None:
        state["lm_head.weight"] = student.lm_head.weight.detach().to(torch.bfloat16).contiguous()
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(dict(cfg, torch_dtype="bfloat16"), indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (target_path / name).is_file() and target_path.resolve() != out.resolve():
            shutil.copyfile(target_path / name, out / name)
    (out / "training_args.json").write_text(json.dumps(info, indent=2, default=str) + "\n")


def _last_hidden(model: Decoder, tokens: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The last layer's output (before the final norm) at every position: [B, T, d]."""
    B, T = tokens.shape
    cache = model.new_cache(B, T)
    out = model(tokens, cache, list(range(B)), num_new=list(lengths), logits="last",
                hidden_layers=(model.args.num_layers - 1,))
    return out.hidden


def _answer_positions(tokens, lengths, prompt_lens) -> torch.Tensor:
    """[B, T] bool: positions t whose next token (t + 1) is an answer token."""
    pos = torch.arange(tokens.shape[1], device=tokens.device)[None]
    return (pos >= prompt_lens[:, None] - 1) & (pos < lengths[:, None] - 1)


def distill_step(student: Decoder, target: Decoder, tokens, lengths, prompt_lens, chunk: int = 1024) -> dict:
    """Forward KL(target || student) over the full vocabulary at answer positions, and top-1 agreement. The
    vocabulary-sized logits are made `chunk` positions at a time."""
    sel = _answer_positions(tokens, lengths, prompt_lens)
    with torch.no_grad():
        t_h = _last_hidden(target, tokens, lengths.tolist())[sel]
    s_h = _last_hidden(student, tokens, lengths.tolist())[sel]
    n = max(int(sel.sum()), 1)
    loss = s_h.new_zeros((), dtype=torch.float32)
    agree = 0
    for i in range(0, s_h.shape[0], chunk):
        with torch.no_grad():
            t_logp = target.logits(t_h[i:i + chunk]).float().log_softmax(-1)
        s_logp = student.logits(s_h[i:i + chunk]).float().log_softmax(-1)
        loss = loss + F.kl_div(s_logp, t_logp, log_target=True, reduction="sum") / n
        agree += int((s_logp.argmax(-1) == t_logp.argmax(-1)).sum())
    return {"loss": loss, "acc0": agree / n, "tokens": n}


def distill(args) -> dict:
    from training.train import _setup_distributed, collate, make_batches, read_rows
    from workers.models.loader import load_model, resolve_dtype

    rank, world = _setup_distributed()
    device = torch.device(args.device)
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
    out = Path(args.out)
    state_path = out / "state" / "trainer_state.pt"
    if args.student:
        slm = load_model(args.student, "fp32", device=str(device))
        if slm.model.args.vocab_size != target.args.vocab_size:
            raise ValueError(f"--student {args.student} has a vocabulary of {slm.model.args.vocab_size}, the "
                             f"target {target.args.vocab_size}: a drafter must share the target's tokenizer")
        student, cfg, src = slm.model, json.loads((slm.path / "config.json").read_text()), slm.path
    else:
        student, cfg = build_student(target, lm.path, args.student_layers or 4)
        src = lm.path
    student.to(device).train().requires_grad_(True)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    step, elapsed_before = 0, 0.0
    if args.resume and state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        student.load_state_dict(st["student"])
        opt.load_state_dict(st["optimizer"])
        step, elapsed_before = st["step"], st.get("elapsed_s", 0.0)
        torch.set_rng_state(st["rng"])

    batches = make_batches(rows, args.batch_tokens, args.seed)
    steps_per_epoch = max(len(batches) // world, 1)
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    warmup = min(args.warmup, total_steps // 10 + 1)
    t0 = time.time() - elapsed_before

    def lr_at(s: int) -> float:
        if s < warmup:
            return args.lr * (s + 1) / warmup
        frac = (s - warmup) / max(total_steps - warmup, 1)
        if args.time_budget_min:
            frac = max(frac, (time.time() - t0) / (args.time_budget_min * 60))
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    amp = args.amp if args.amp is not None else tdtype == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    history: list[dict] = []
    info = {k: v for k, v in vars(args).items() if k != "func"}
    n_params = sum(p.numel() for p in student.parameters())

    def evaluate() -> None:
        student.eval()
        loss = acc = tokens_n = 0.0
        with torch.no_grad(), autocast:
            for idx in make_batches(held, args.batch_tokens, 0)[: args.eval_batches]:
                s = distill_step(student, target, *collate(held, idx, device))
                loss += float(s["loss"]) * s["tokens"]
                acc += s["acc0"] * s["tokens"]
                tokens_n += s["tokens"]
        student.train()
        if tokens_n:
            history.append({"loss": round(loss / tokens_n, 4), "acc0": round(acc / tokens_n, 4), "step": step,
                            "elapsed_s": round(time.time() - t0, 1)})
            if rank == 0:
                tqdm.write(json.dumps({"eval": "model", **history[-1]}))

    def save() -> None:
        if rank != 0:
            return
        save_student(student, cfg, src, out, dict(info, drafter="model", steps=step, params=n_params,
                                                  elapsed_s=round(time.time() - t0, 1),
                                                  eval=history[-1] if history else None))
        state_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"student": student.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "elapsed_s": time.time() - t0, "rng": torch.get_rng_state()}, state_path)

    bar = tqdm(total=total_steps, initial=step, desc="distil model", dynamic_ncols=True,
               disable=rank != 0 or not args.progress)
    epoch, start_step, stop = step // steps_per_epoch, step, False
    while step < total_steps and not stop:
        every = make_batches(rows, args.batch_tokens, args.seed + epoch)
        order = [every[(rank + world * i) % len(every)] for i in range(steps_per_epoch)]
        for bi in range(step % steps_per_epoch, len(order)):
            tokens, lengths, plens = collate(rows, order[bi], device)
            for grp in opt.param_groups:
                grp["lr"] = lr_at(step)
            with autocast:
                s = distill_step(student, target, tokens, lengths, plens)
            opt.zero_grad(set_to_none=True)
            s["loss"].backward()
            if world > 1:  # data parallel: average the gradients over the ranks (every rank takes equal batches)
                for p in params:
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{float(s['loss'].detach()):.3f}", acc=f"{s['acc0']:.2f}")
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
    f = out / "model.safetensors"
    return {"drafter": "model", "steps": step, "train_s": round(time.time() - t0, 1), "params": n_params,
            "checkpoint_bytes": f.stat().st_size if f.exists() else 0, "out": str(out),
            "eval": history[-1] if history else None}
