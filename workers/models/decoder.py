"""A compact decoder-only transformer for the Llama, Qwen2, Qwen3 and Gemma 3 families.

One forward pass scores T new positions for each of B sequences held in a slot-based KV cache
(`workers/models/kv_cache.py`): the engine uses T = 1 for plain decoding, T = k + 1 to verify k draft tokens, and
T = prompt length for prefill. Rows shorter than T are padded at the end; their pad positions are written to the
cache past the row's real tokens, where causality keeps them invisible and the next write overwrites them.

The model knows nothing about ranks or speculation: tensor parallelism is applied to it from outside (gpt-fast's
`tp.py` pattern), and the engine decides what to feed it. It can return the hidden states of chosen layers, which
learned drafters (EAGLE, DSpark) read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workers.models.config import ModelArgs
from workers.models.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, gemma: bool):
        super().__init__()
        self.eps = eps
        self.gemma = gemma  # Gemma scales by (1 + w) in float32; Llama/Qwen cast back before scaling by w
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:
            return (xf * (1.0 + self.weight.float())).type_as(x)
        return self.weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _activation(name: str):
    if name in ("silu", "swish"):
        return F.silu
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unsupported activation {name!r}")


def attend(
    q: torch.Tensor,  # [B, heads, T, hd]
    keys: torch.Tensor,  # [B, kv_heads, L, hd]
    values: torch.Tensor,  # [B, kv_heads, L, hd]
    mask: torch.Tensor | None,  # [B, 1, T, L] bool, True = attend
    scale: float | None = None,
) -> torch.Tensor:  # [B, heads, T, hd]
    """Attention of T new positions over a cache, grouped-query aware.

    GQA: the `rep` query heads that share a KV head are folded into the query length (rows ordered (rep, T)), so
    attention reads the cache as it is. SDPA's enable_gqa expands K and V instead: a copy of the whole cache per
    layer and step, 4-5x slower in bf16 on CPU for the same math."""
    B, H, T, hd = q.shape
    rep = H // keys.shape[1]
    if rep > 1:
        q = q.reshape(B, keys.shape[1], rep * T, hd)
        if mask is not None:
            mask = mask[:, :, None].expand(B, 1, rep, T, mask.shape[-1]).reshape(B, 1, rep * T, -1)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(B, H, T, hd)  # CUDA's fused kernels return a non-contiguous layout: no view


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.hd = args.num_heads, args.num_kv_heads, args.head_dim
        d, bias = args.hidden_size, args.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, d, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(self.hd, args.rms_norm_eps, args.gemma_norm)
            self.k_norm = RMSNorm(self.hd, args.rms_norm_eps, args.gemma_norm)
        else:
            self.q_norm = self.k_norm = None
        self.scale = args.attn_scale or self.hd**-0.5

    def forward(
        self,
        x: torch.Tensor,  # [B, T, d]
        cos: torch.Tensor,  # [B, T, hd]
        sin: torch.Tensor,  # [B, T, hd]
        mask: torch.Tensor | None,  # [B, 1, T, L] bool, True = attend
        cache: KVCache,
        slots: torch.Tensor,  # [B]
        read_slots: torch.Tensor | slice,
        positions: torch.Tensor,  # [B, T]
        kv_len: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        cache.write(self.layer, slots, positions, k, v)
        keys, values = cache.read(self.layer, read_slots, kv_len)  # [B, n_kv, L, hd]
        out = attend(q, keys, values, mask, self.scale)  # [B, heads, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.act = _activation(args.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        eps, g = args.rms_norm_eps, args.gemma_norm
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, eps, g)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps, g)
        self.sandwich = args.sandwich_norm
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, eps, g)
            self.post_feedforward_layernorm = RMSNorm(args.hidden_size, eps, g)

    def forward(self, x, cos, sin, mask, cache, slots, read_slots, positions, kv_len):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, slots, read_slots, positions, kv_len)
        if self.sandwich:  # Gemma 3: norm the attention output, then norm around the MLP
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [B, T, V] float32 (or [B, 1, V] with logits="last")
    hidden: torch.Tensor | None  # [B, T, len(hidden_layers) * d] in the model dtype, or None


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.gemma_norm)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.packed_lm_head: nn.Module | None = None  # fp16w: set by workers.models.packed.pack_fp16_weights
        self._rope_tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_cache(self, num_slots: int, capacity: int) -> KVCache:
        a = self.args
        return KVCache(a.num_layers, num_slots, capacity, a.num_kv_heads, a.head_dim, self.dtype, self.device)

    def lm_head_weight(self) -> torch.Tensor:  # [V, d]
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def _rope(self, kind: str, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the positions: 2 x [B, T, hd], computed exactly as transformers does (float32 angles)."""
        need = int(positions.max()) + 1
        table = self._rope_tables.get(kind)
        if table is None or table[0].shape[0] < need:
            inv_freq, scaling = self.args.rope[kind]
            size = max(need, 4096, 2 * (table[0].shape[0] if table else 0))
            freqs = torch.arange(size, dtype=torch.float, device=self.device)[:, None] * inv_freq.to(self.device)
            emb = torch.cat((freqs, freqs), dim=-1)
            table = ((emb.cos() * scaling).to(self.dtype), (emb.sin() * scaling).to(self.dtype))
            self._rope_tables[kind] = table
        return table[0][positions], table[1][positions]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, d]
        x = self.embed_tokens(tokens)
        if self.args.embed_scale != 1.0:
            x = x * torch.tensor(self.args.embed_scale, dtype=x.dtype)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: [..., d] -> [..., V] float32."""
        h = self.norm(h)
        out = (F.linear(h, self.lm_head_weight()) if self.packed_lm_head is None else self.packed_lm_head(h)).float()
        cap = self.args.final_logit_softcapping
        if cap:
            out = torch.tanh(out / cap) * cap
        return out

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T] long, rows padded at the end
        cache: KVCache,
        slots: list[int],  # [B] cache slot of each row
        num_new: list[int] | None = None,  # [B] real tokens per row (default: T for every row)
        logits: str = "all",  # "all" -> [B, T, V]; "last" -> logits of each row's last real token, [B, 1, V]
        hidden_layers: tuple[int, ...] = (),  # outputs of these decoder layers are returned, concatenated
        inputs_embeds: torch.Tensor | None = None,  # [B, T, d] overrides the embedding of tokens
        tree: torch.Tensor | None = None,  # [B, T] long: parent of each new position within its row, -1 = none
    ) -> ForwardOutput:
        """Score T new positions per row, starting at each slot's current length, and advance the slot lengths by
        num_new. The caller rolls lengths back for rejected positions.

        With `tree`, the T new positions of a row are the nodes of a token tree rather than a sequence: node t sits
        at sequence position start + depth(t) (RoPE) and attends to the cached prefix and its own ancestors only,
        while its keys and values are still written to cache position start + t (the caller compacts the accepted
        path afterwards, `KVCache.compact`). A row whose parents are t - 1 everywhere is an ordinary chain."""
        B, T = tokens.shape
        num_new = num_new or [T] * B
        starts = [cache.lengths[s] for s in slots]
        if max(starts) + T > cache.capacity:
            raise ValueError(f"sequence would exceed the KV cache capacity of {cache.capacity} positions")
        dev = self.device
        start_t = torch.tensor(starts, device=dev)
        positions = start_t[:, None] + torch.arange(T, device=dev)  # [B, T] where each new position is written
        kv_len = max(starts) + T
        slot_t = torch.tensor(slots, device=dev)
        contiguous = slots == list(range(slots[0], slots[0] + B))
        read_slots = slice(slots[0], slots[0] + B) if contiguous else slot_t
        layout = None if tree is None else _tree_layout(tree.to(dev))  # depth [B, T], ancestor-or-self [B, T, T]
        rope_pos = positions if layout is None else start_t[:, None] + layout[0]

        masks: dict[int | None, torch.Tensor | None] = {}
        visibility = None
        for window in set(self.args.sliding_window):
            if tree is None and B == 1 and T == 1 and (window is None or kv_len <= window):
                masks[window] = None  # one query attending to everything before it: no mask needed
                continue
            if visibility is None:
                visibility = _visibility(kv_len, start_t, positions, layout)
            m, key_pos = visibility
            if window is not None:
                m = m & (key_pos[:, None, :] > rope_pos[:, :, None] - window)
            masks[window] = m[:, None]
        ropes = {kind: self._rope(kind, rope_pos) for kind in self.args.rope}

        x = inputs_embeds if inputs_embeds is not None else self.embed(tokens)
        captured = []
        want = set(hidden_layers)
        for i, layer in enumerate(self.layers):
            cos, sin = ropes[self.args.rope_kind[i]]
            x = layer(x, cos, sin, masks[self.args.sliding_window[i]], cache, slot_t, read_slots, positions, kv_len)
            if i in want:
                captured.append((i, x))
        for s, n in zip(slots, num_new):
            cache.lengths[s] += n
        if logits == "last":
            last = torch.tensor([n - 1 for n in num_new], device=dev)
            x = x[torch.arange(B, device=dev), last][:, None]
        hidden = None
        if hidden_layers:
            by_layer = dict(captured)
            hidden = torch.cat([by_layer[i] for i in hidden_layers], dim=-1)
        return ForwardOutput(logits=self.logits(x), hidden=hidden)



def _visibility(kv_len: int, start_t: torch.Tensor, positions: torch.Tensor,
                layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(which cache entries each new position attends to [B, T, L], the sequence position of each entry [B, L]).
    Without a tree layout: causal. With one: the prefix before each row's start, then the node's ancestors."""
    B, T = positions.shape
    kpos = torch.arange(kv_len, device=positions.device)
    if layout is None:
        return kpos[None, None, :] <= positions[:, :, None], kpos[None].expand(B, kv_len)
    depth, ancestor = layout
    rel = kpos[None, :] - start_t[:, None]  # [B, L] offset of each cache entry within the new block
    inside = (rel >= 0) & (rel < T)
    relc = rel.clamp(0, T - 1)
    key_pos = torch.where(inside, start_t[:, None] + depth.gather(1, relc), kpos[None])
    tree_part = ancestor.gather(2, relc[:, None, :].expand(B, T, kv_len))  # [B, T, L]
    return torch.where(inside[:, None, :], tree_part, (rel < 0)[:, None, :]), key_pos


def _tree_layout(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """parents [B, T] (each < its own index, -1 for a root) -> (depth [B, T] from 0, ancestor-or-self [B, T, T])."""
    B, T = parents.shape
    depth = torch.zeros(B, T, dtype=torch.long, device=parents.device)
    anc = torch.eye(T, dtype=torch.bool, device=parents.device).repeat(B, 1, 1)
    rows = torch.arange(B, device=parents.device)
    for t in range(1, T):
        p = parents[:, t]
        has = p >= 0
        pc = p.clamp(min=0)
        depth[:, t] = torch.where(has, depth[rows, pc] + 1, 0)
        anc[:, t] |= anc[rows, pc] & has[:, None]
    return depth, anc
