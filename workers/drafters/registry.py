"""Turn a `--draft` spec into a drafter.

    none            no drafter: plain target decoding through the same loop (k = 0)
    ngram[:N]       prompt lookup with n-grams up to N tokens (default 3)
    model:PATH      an independent small LM (name, GGUF, directory or cached hub id) sharing the target's tokenizer
    KIND:PATH       a learned drafter checkpoint (mtp1, eagle, dspark) trained with `specray train`
    KIND            the learned drafter shipped for the target (e.g. `dspark` for smollm2-135m)
"""

from __future__ import annotations

from workers.drafters.base import Drafter

LEARNED_KINDS = ("mtp1", "eagle", "dspark")


def parse_draft_spec(spec: str) -> tuple[str, str | None]:
    spec = (spec or "none").strip()
    kind, _, arg = spec.partition(":")
    kind = kind.lower()
    if kind in ("none", "ngram", *LEARNED_KINDS) or (kind == "model" and arg):
        return kind, arg or None
    if kind == "model":
        raise ValueError("--draft model needs a path: model:PATH")
    raise ValueError(f"unknown draft {spec!r}; use none, ngram[:N], model:PATH or one of "
                     f"{', '.join(k + '[:PATH]' for k in LEARNED_KINDS)}")


def build_drafter(spec: str, target, dtype="fp32", max_batch: int = 8, max_model_len: int = 4096,
                  min_confidence: float | None = None, tree_width: int = 1) -> Drafter | None:
    """target: the LoadedModel being served (learned drafters share its embedding and LM head). min_confidence:
    eagle and dspark end a draft where its predicted survival falls below it (None: the drafter's default).
    tree_width: learned drafters draft greedy token trees with that many first tokens (1: chains)."""
    kind, arg = parse_draft_spec(spec)
    if kind == "none":
        return None
    if kind == "ngram":
        from workers.drafters.ngram import NgramDrafter

        try:
            n = int(arg) if arg else 3
        except ValueError:
            raise ValueError(f"ngram size must be an integer, got {arg!r}") from None
        return NgramDrafter(max_ngram=n)
    if kind == "model":
        from workers.drafters.model import ModelDrafter
        from workers.models.loader import load_model

        draft = load_model(arg, dtype)
        if abs(draft.vocab_size - target.vocab_size) > 256 or (
            draft.tokenizer.get_vocab() != target.tokenizer.get_vocab()
        ):
            raise ValueError(f"draft model {arg!r} does not share the target's tokenizer")
        return ModelDrafter(draft, max_batch=max_batch, max_model_len=max_model_len)
    from workers.drafters.learned import LearnedDrafter, load_head, shipped_checkpoint

    path = arg or shipped_checkpoint(kind, target.name)
    if path is None:
        raise ValueError(f"no {kind} drafter is shipped for target {target.name!r}; train one with "
                         f"`specray train --drafter {kind}` and pass --draft {kind}:PATH")
    head = load_head(path, target.model.dtype, target.model.device)
    if head.cfg.kind != kind:
        raise ValueError(f"{path} holds a {head.cfg.kind} drafter, not {kind}")
    head.attach(target.model)
    return LearnedDrafter(head, max_batch=max_batch, max_model_len=max_model_len,
                          min_confidence=min_confidence, tree_width=tree_width)
