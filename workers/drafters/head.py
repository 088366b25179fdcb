"""The network behind the learned drafters (mtp1, eagle, dspark): a small transformer over the target's features.

One module, three configurations. For every committed position t the head reads the target's hidden states at t
(one or more layers, normed and fused to d) and the embedding of the token at t + 1, projects both to d and runs
them through a few causal transformer layers: the "context stream". Its output at t predicts the token at t + 2,
the first draft token after the last committed one (EAGLE, Li et al. 2401.15077; DeepSeek-V3's MTP module).
What differs is how the block of further draft tokens is made:

- `mtp1`: nothing further; one draft token per step from the last layer's features (the MTP-1 baseline).
- `eagle`: a chain. Draft position i > 0 feeds the head's own output at i - 1 where the target features would be,
  plus the embedding of the token just drafted, and attends to the context stream: one head forward per token.
  Training unrolls the chain on the head's own outputs (EAGLE-3's training-time test, 2503.01840).
- `dspark`: a block. Positions 1 .. K-1 are learned mask embeddings at their own positions, attending to the
  context stream and to each other, so the whole block comes from ONE parallel forward; a small sequential
  (Markov) head then conditions each position on the token drafted before it, and a confidence head predicts the
  probability that each position is accepted given the ones before it were (DeepSeek's DSpark/DeepSpec design).

The embedding and the LM head are the target's, shared and frozen (`attach`), never stored in a checkpoint. The
LM head is restricted to a draft vocabulary (the tokens the target actually writes, most frequent first): a
drafter only has to propose likely tokens, and the smaller matrix keeps every head step cheap on a CPU.

Two attention paths share the layers: `context` / `block` for training (the whole sequence at once, blocks for
many anchors in parallel, explicit masks), and `cached` for serving (a slot KV cache, `workers/models/kv_cache.py`,
into which block positions are written and rolled back after drafting).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from workers.models.decoder import RMSNorm, attend
from workers.models.kv_cache import KVCache

KINDS = ("mtp1", "eagle", "dspark")


@dataclass
class HeadConfig:
    kind: str  # mtp1 | eagle | dspark
    hidden_size: int  # the target's d
    vocab_size: int  # the target's vocabulary
    feature_layers: list[int]  # target layers whose outputs are read, concatenated in this order
    num_layers: int = 1
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 1536
    block_size: int = 1  # draft positions per anchor: 1 for mtp1, the chain length for eagle, the block for dspark
    draft_vocab_size: int = 0  # rows of the LM head the drafter may propose; 0 = the whole vocabulary
    markov_size: int = 512  # dspark's sequential head width
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    target: str = ""  # what the head was trained for (informational; the loader checks shapes)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown learned drafter kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.kind == "mtp1" and self.block_size != 1:
            raise ValueError("mtp1 drafts exactly one token per step (block_size 1)")
        if not self.feature_layers:
            raise ValueError("a learned drafter needs at least one target feature layer")
        self.feature_layers = [int(x) for x in self.feature_layers]

    def to_dict(self) -> dict:
        return asdict(self)


def _rope(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [*positions.shape, head_dim]."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    ang = positions.float()[..., None] * inv
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class HeadLayer(nn.Module):
    """A pre-norm Llama-style layer whose attention is supplied by the caller (training or cached path)."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        d, self.h, self.kv, self.hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps, False)
        self.q_proj = nn.Linear(d, self.h * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.h * self.hd, d, bias=False)
        self.mlp_norm = RMSNorm(d, cfg.rms_norm_eps, False)
        self.gate_proj = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, d, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: [..., T, d] -> q [..., T, h, hd], k and v [..., T, kv, hd] (RoPE applied to q and k)."""
        h = self.attn_norm(x)
        shape = x.shape[:-1]
        q = self.q_proj(h).view(*shape, self.h, self.hd)
        k = self.k_proj(h).view(*shape, self.kv, self.hd)
        v = self.v_proj(h).view(*shape, self.kv, self.hd)
        c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
        return _rotate(q, c, s), _rotate(k, c, s), v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """attn: [..., T, h * hd] -> the layer's output [..., T, d]."""
        x = x + self.o_proj(attn)
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class DraftHead(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.feature_norm = RMSNorm(d, eps, False)  # applied to each feature layer's chunk
        self.fuse = nn.Linear(len(cfg.feature_layers) * d, d, bias=False)
        self.token_norm = RMSNorm(d, eps, False)
        self.in_proj = nn.Linear(2 * d, d, bias=False)
        self.layers = nn.ModuleList(HeadLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(d, eps, False)
        if cfg.kind == "dspark":
            self.mask_embed = nn.Parameter(torch.randn(max(cfg.block_size - 1, 1), d) * 0.02)
            self.markov_in = nn.Linear(2 * d, cfg.markov_size, bias=False)
            self.markov_out = nn.Linear(cfg.markov_size, d, bias=False)
            nn.init.zeros_(self.markov_out.weight)  # starts as the identity: z = o
            self.confidence = nn.Linear(d + 1, 1)
        vocab = cfg.draft_vocab_size or cfg.vocab_size
        self.register_buffer("draft_vocab", torch.arange(vocab, dtype=torch.long))  # [Vd] target token ids
        self._embed: torch.Tensor | None = None  # [V, d] the target's embedding (not a parameter)
        self._lm: torch.Tensor | None = None  # [Vd, d] the target's LM head rows for the draft vocabulary
        self._lm_packed: nn.Module | None = None  # the same rows packed in fp16, when the target is fp16w
        self._embed_scale = 1.0

    # --- the target's shared weights ---------------------------------------------------------------------------
    def attach(self, target) -> None:
        """Share the (frozen) embedding and LM head of a target `Decoder`."""
        a = target.args
        if a.hidden_size != self.cfg.hidden_size or a.vocab_size != self.cfg.vocab_size:
            raise ValueError(f"this drafter was trained for a target with d={self.cfg.hidden_size}, "
                             f"vocab={self.cfg.vocab_size}; the target has d={a.hidden_size}, vocab={a.vocab_size}")
        if max(self.cfg.feature_layers) >= a.num_layers:
            raise ValueError(f"drafter reads target layer {max(self.cfg.feature_layers)}, the target has "
                             f"{a.num_layers} layers")
        dev = self.draft_vocab.device
        self._embed = target.embed_tokens.weight.detach()
        self._embed_scale = a.embed_scale
        self._lm = target.lm_head_weight().detach()[self.draft_vocab.to(target.device)].to(dev)
        self._lm_packed = None
        if target.packed_lm_head is not None:  # fp16w target: score the draft vocabulary the same way
            from workers.models.packed import PackedLinear

            self._lm_packed = PackedLinear(self._lm)

    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        self.draft_vocab = token_ids.to(self.draft_vocab.device, torch.long)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:  # [...] -> [..., d]
        x = F.embedding(tokens.to(self._embed.device), self._embed).to(self.in_proj.weight.device)
        return x * self._embed_scale if self._embed_scale != 1.0 else x

    def logits(self, z: torch.Tensor) -> torch.Tensor:  # [..., d] -> [..., Vd] float32 over the draft vocabulary
        h = self.norm(z)
        if self._lm_packed is not None and not torch.is_grad_enabled():
            return self._lm_packed(h)
        return F.linear(h, self._lm.to(h.dtype)).float()

    # --- inputs ------------------------------------------------------------------------------------------------
    def context_inputs(self, features: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """features: [..., F] target hidden states at t; next_tokens: [...] tokens at t + 1 -> [..., d]."""
        d = self.cfg.hidden_size
        f = features.to(self.fuse.weight.dtype)
        f = self.feature_norm(f.view(*f.shape[:-1], -1, d)).flatten(-2)
        return self.chain_inputs(self.fuse(f), next_tokens)

    def chain_inputs(self, fused: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """fused: [..., d] (fused target features, or the head's own output in an eagle chain)."""
        e = self.token_norm(self.embed(next_tokens).to(fused.dtype))
        return self.in_proj(torch.cat([fused, e], dim=-1))

    def markov(self, o: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
        """dspark's sequential head: o [..., d] + what the previously drafted token says -> z [..., d]."""
        e = self.token_norm(self.embed(prev_tokens).to(o.dtype))
        return o + self.markov_out(F.silu(self.markov_in(torch.cat([o, e], dim=-1))))

    def confidence_logit(self, z: torch.Tensor, max_prob: torch.Tensor) -> torch.Tensor:
        """Logit of P(this position is accepted | the ones before it were): [..., d], [...] -> [...] float32.
        Reads the Markov state and the parallel guess's top probability, detached: it learns to judge the draft
        without changing it."""
        x = torch.cat([self.norm(z.detach()), max_prob.detach()[..., None].to(z.dtype)], dim=-1)
        return self.confidence(x).float().squeeze(-1)

    def confidence_of(self, z: torch.Tensor, max_prob: torch.Tensor) -> torch.Tensor:  # in [0, 1]
        return torch.sigmoid(self.confidence_logit(z, max_prob))

    # --- training path -----------------------------------------------------------------------------------------
    def context(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The causal context stream. x: [B, T, d] -> ([B, T, d], per layer (k, v) each [B, T, kv, hd])."""
        B, T, _ = x.shape
        cfg = self.cfg
        cos, sin = _rope(torch.arange(T, device=x.device), cfg.head_dim, cfg.rope_theta, x.dtype)
        kvs = []
        for layer in self.layers:
            q, k, v = layer.qkv(x, cos, sin)
            kvs.append((k, v))
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=cfg.num_kv_heads != cfg.num_heads)
            x = layer.finish(x, o.transpose(1, 2).reshape(B, T, -1))
        return x, kvs

    def block(self, x: torch.Tensor, kvs, anchors: torch.Tensor) -> torch.Tensor:
        """Block positions after anchors. x: [B, A, K, d] inputs at positions anchor + 1 .. anchor + K;
        anchors: [B, A]. Each block position attends to the context stream up to its anchor and causally to the
        block before it. Returns [B, A, K, d]."""
        B, A, K, _ = x.shape
        cfg = self.cfg
        rep = cfg.num_heads // cfg.num_kv_heads
        pos = anchors[..., None] + 1 + torch.arange(K, device=x.device)  # [B, A, K]
        cos, sin = _rope(pos, cfg.head_dim, cfg.rope_theta, x.dtype)
        T = kvs[0][0].shape[1]
        ctx_ok = torch.arange(T, device=x.device)[None, None, :] <= anchors[..., None]  # [B, A, T]
        blk_ok = torch.ones(K, K, dtype=torch.bool, device=x.device).tril()  # [K, K]
        scale = cfg.head_dim**-0.5
        for layer, (kc, vc) in zip(self.layers, kvs):
            q, k, v = layer.qkv(x, cos, sin)  # [B, A, K, h|kv, hd]
            kc_, vc_ = kc.repeat_interleave(rep, dim=2), vc.repeat_interleave(rep, dim=2)  # [B, T, h, hd]
            k_, v_ = k.repeat_interleave(rep, dim=3), v.repeat_interleave(rep, dim=3)
            s_ctx = torch.einsum("bakhd,bthd->bahkt", q, kc_).float() * scale
            s_blk = torch.einsum("bakhd,bajhd->bahkj", q, k_).float() * scale
            s_ctx = s_ctx.masked_fill(~ctx_ok[:, :, None, None, :], float("-inf"))
            s_blk = s_blk.masked_fill(~blk_ok, float("-inf"))
            p = torch.cat([s_ctx, s_blk], dim=-1).softmax(-1).to(x.dtype)
            o = torch.einsum("bahkt,bthd->bakhd", p[..., :T], vc_) + torch.einsum("bahkj,bajhd->bakhd", p[..., T:], v_)
            x = layer.finish(x, o.reshape(B, A, K, -1))
        return x

    # --- serving path ------------------------------------------------------------------------------------------
    def new_cache(self, num_slots: int, capacity: int) -> KVCache:
        c = self.cfg
        w = self.in_proj.weight
        return KVCache(c.num_layers, num_slots, capacity, c.num_kv_heads, c.head_dim, w.dtype, w.device)

    def cached(self, x: torch.Tensor, cache: KVCache, slots: list[int], num_new: list[int]) -> torch.Tensor:
        """Run T new positions per row (right padded) from each slot's current length; lengths advance by
        num_new. x: [B, T, d] -> [B, T, d]."""
        B, T, _ = x.shape
        cfg = self.cfg
        dev = x.device
        starts = torch.tensor([cache.lengths[s] for s in slots], device=dev)
        positions = starts[:, None] + torch.arange(T, device=dev)  # [B, T]
        kv_len = int(max(cache.lengths[s] for s in slots)) + T
        if kv_len > cache.capacity:
            raise ValueError(f"sequence would exceed the drafter's cache of {cache.capacity} positions")
        slot_t = torch.tensor(slots, device=dev)
        cos, sin = _rope(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        mask = (torch.arange(kv_len, device=dev)[None, None, :] <= positions[:, :, None])[:, None]  # [B,1,T,L]
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(x, cos, sin)
            cache.write(i, slot_t, positions, k.transpose(1, 2), v.transpose(1, 2))
            keys, values = cache.read(i, slot_t, kv_len)
            o = attend(q.transpose(1, 2), keys, values, mask)
            x = layer.finish(x, o.transpose(1, 2).reshape(B, T, -1))
        for s, n in zip(slots, num_new):
            cache.lengths[s] += n
        return x
