"""ModelArgs: the plain description of a decoder that `workers/models/decoder.py` builds.

Read once from a Hugging Face config (any of the supported families) and never touched again; everything family
specific is a field here, so the model code has no `if family == ...` branches beyond reading these flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gemma3_text", "gemma3")


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # qwen2: q/k/v projections carry a bias
    qk_norm: bool = False  # qwen3, gemma3: RMSNorm over head_dim on q and k before RoPE
    gemma_norm: bool = False  # gemma: RMSNorm scales by (1 + w), computed in float32
    sandwich_norm: bool = False  # gemma3: extra norms after attention and around the MLP
    embed_scale: float = 1.0  # gemma: embeddings multiplied by sqrt(hidden_size)
    hidden_act: str = "silu"
    attn_scale: float = 0.0  # softmax scale; 0 means head_dim ** -0.5
    final_logit_softcapping: float | None = None
    # Per layer: sliding window size (None = full attention) and index into `rope_tables`.
    sliding_window: list[int | None] = field(default_factory=list)
    rope_kind: list[str] = field(default_factory=list)
    # rope kind -> (inv_freq [head_dim / 2], attention_scaling)
    rope: dict[str, tuple[torch.Tensor, float]] = field(default_factory=dict)

    @classmethod
    def from_hf_config(cls, cfg) -> "ModelArgs":
        """Build from a transformers PretrainedConfig (Llama, Qwen2, Qwen3 or Gemma 3 text)."""
        model_type = cfg.model_type
        if model_type == "gemma3":  # multimodal wrapper: use its text tower
            cfg = cfg.text_config
            model_type = cfg.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; specray implements {', '.join(SUPPORTED_MODEL_TYPES[:4])}"
            )
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        n = cfg.num_hidden_layers
        gemma = model_type == "gemma3_text"
        layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n)
        window = getattr(cfg, "sliding_window", None)
        sliding = [window if t == "sliding_attention" and window else None for t in layer_types]
        rope: dict[str, tuple[torch.Tensor, float]] = {}
        kinds = []
        for t in layer_types:
            kind = t if gemma else "full_attention"
            if kind not in rope:
                rope[kind] = _rope_parameters(cfg, kind if gemma else None, head_dim)
            kinds.append(kind)
        return cls(
            model_type=model_type,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=n,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
            attention_bias=bool(getattr(cfg, "attention_bias", model_type == "qwen2")),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            gemma_norm=gemma,
            sandwich_norm=gemma,
            embed_scale=cfg.hidden_size**0.5 if gemma else 1.0,
            hidden_act=getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu"),
            attn_scale=cfg.query_pre_attn_scalar**-0.5 if gemma else 0.0,
            final_logit_softcapping=getattr(cfg, "final_logit_softcapping", None),
            sliding_window=sliding,
            rope_kind=kinds,
            rope=rope,
        )


def _rope_parameters(cfg, layer_type: str | None, head_dim: int) -> tuple[torch.Tensor, float]:
    """inv_freq and attention scaling, computed by transformers' own RoPE initialisers so every scaling variant
    (linear, llama3, yarn, ...) matches the reference exactly."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = cfg.rope_parameters
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu", **kwargs)
    return inv_freq.float(), float(scaling)
