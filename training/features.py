"""Target features for drafter training, computed online (and optionally cached on disk).

The drafter learns from the target's hidden states at chosen layers and from its next-token distribution. They
are recomputed with a batched target forward for every training batch instead of being stored: a feature cache
holds (layers x d) values per token (for SmolLM2 with three layers, ~3.5 KB per token in bf16, 3.5 GB per million
tokens), which is why DeepSpec's cache runs to tens of terabytes for a 4B target. A target forward over a batch
costs about what the drafter's own training step costs, so online is the default; `FeatureCache` keeps them in
safetensors shards for users who train many epochs over a small set and prefer disk to compute. It prints its
estimated size before it writes anything.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from workers.models.decoder import Decoder


class FeatureExtractor:
    """features = outputs of `layers` concatenated, plus the last layer's output (for the target's distribution)."""

    def __init__(self, target: Decoder, layers: list[int]):
        self.target = target
        self.layers = tuple(layers)
        self.last = target.args.num_layers - 1
        self._want = tuple(dict.fromkeys(self.layers + (self.last,)))

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: [B, T] right padded -> (features [B, T, len(layers) * d], last hidden [B, T, d])."""
        B, T = tokens.shape
        cache = self.target.new_cache(B, T)
        out = self.target(tokens.to(self.target.device), cache, list(range(B)), num_new=list(lengths), logits="last",
                          hidden_layers=self._want)
        d = self.target.args.hidden_size
        chunks = {layer: out.hidden[..., i * d:(i + 1) * d] for i, layer in enumerate(self._want)}
        feats = torch.cat([chunks[layer] for layer in self.layers], dim=-1)
        return feats, chunks[self.last]

    @torch.no_grad()
    def target_log_probs(self, last_hidden: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
        """The target's next-token log-distribution restricted (and renormalised) to the draft vocabulary:
        [..., d] -> [..., Vd] float32."""
        w = self.target.lm_head_weight()[vocab.to(self.target.device)]
        logits = F.linear(self.target.norm(last_hidden.to(self.target.device)), w).float()
        cap = self.target.args.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.log_softmax(-1)


class FeatureCache:
    """Features of fixed batches in safetensors shards, one file per batch index: `DIR/batch-000123.safetensors`."""

    def __init__(self, directory: str | Path, extractor: FeatureExtractor, total_tokens: int):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.extractor = extractor
        d = extractor.target.args.hidden_size
        per_token = (len(extractor.layers) + 1) * d * extractor.target.embed_tokens.weight.element_size()
        self.estimated_bytes = total_tokens * per_token
        print(f"feature cache {self.dir}: about {self.estimated_bytes / 2**30:.2f} GiB for {total_tokens:,} tokens",
              flush=True)

    def get(self, index: int, tokens: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.dir / f"batch-{index:06d}.safetensors"
        if path.is_file():
            t = load_file(str(path), device=str(self.extractor.target.device))
            if t["tokens"].shape == tokens.shape and torch.equal(t["tokens"].cpu(), tokens.cpu()):
                return t["features"], t["last"]
        feats, last = self.extractor(tokens, lengths)
        tmp = path.with_suffix(".tmp")
        save_file({"tokens": tokens.cpu().contiguous(), "features": feats.cpu().contiguous(),
                   "last": last.cpu().contiguous()}, str(tmp))
        tmp.replace(path)
        return feats, last
