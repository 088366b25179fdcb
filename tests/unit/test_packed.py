"""fp16w: fp16 weights packed for fbgemm, fp32 activations (workers/models/packed.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.engine.draft_client import InProcessDraftClient
from workers.engine.engine import SpecEngine
from workers.engine.sequence import Request
from workers.models.loader import load_model, resolve_dtype
from workers.models.packed import PackedLinear, fp16w_supported, pack_fp16_weights

pytestmark = [pytest.mark.usefixtures("torch_single_thread"),
              pytest.mark.skipif(not fp16w_supported(), reason="this torch build has no fbgemm (not x86-64)")]

PROMPTS = ["The quick brown fox", "def add(a, b):", "Hello world", "Once upon a time"]


def test_packed_linear_multiplies_by_the_fp16_rounded_weight():
    torch.manual_seed(0)
    w = torch.randn(300, 64) * 0.37  # most entries are not fp16-representable
    b = torch.randn(300)
    x = torch.randn(2, 5, 64)  # any leading shape
    y = PackedLinear(w, b)(x)
    exact16 = F.linear(x, w.half().float(), b)
    exact32 = F.linear(x, w, b)
    assert y.shape == (2, 5, 300) and y.dtype == torch.float32
    err16, err32 = (y - exact16).abs().max().item(), (y - exact32).abs().max().item()
    assert err16 < 2e-5
    assert err32 > 10 * err16  # negative control: the weights really are fp16, not the fp32 originals


def test_rows_do_not_depend_on_how_many_are_multiplied():
    """A verify step multiplies k + 1 rows where plain decoding multiplies one: the results must agree to fp32
    rounding, or greedy speculative output could drift from target-only output."""
    torch.manual_seed(1)
    lin = PackedLinear(torch.randn(512, 96))
    x = torch.randn(9, 96)
    together = lin(x)
    alone = torch.cat([lin(x[i:i + 1]) for i in range(9)])
    assert (together - alone).abs().max().item() < 1e-4


def test_loading_fp16w_packs_every_linear_layer(tiny_llama):
    ref = load_model(str(tiny_llama), "fp32").model
    lm = load_model(str(tiny_llama), "fp16w")
    m = lm.model
    assert not [n for n, mod in m.layers.named_modules() if isinstance(mod, nn.Linear)]
    assert sum(isinstance(mod, PackedLinear) for mod in m.layers.modules()) == 7 * len(m.layers)
    assert m.packed_lm_head is not None and m.dtype == torch.float32
    ids = torch.tensor([lm.tokenizer.encode("The quick brown fox jumps over the lazy dog")])
    with torch.inference_mode():
        a = ref(ids, ref.new_cache(1, 64), [0]).logits
        b = m(ids, m.new_cache(1, 64), [0]).logits
    assert torch.allclose(a, b, atol=5e-2, rtol=0)  # a nearby model...
    assert not torch.equal(a, b)  # ...but not the fp32 one
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    with pytest.raises(ValueError, match="already packed"):
        pack_fp16_weights(m)


def test_fp16w_is_cpu_only_and_never_for_training(monkeypatch):
    import workers.models.loader as loader

    with pytest.raises(ValueError, match="CPU weight format"):
        load_model("smollm2-135m", "fp16w", device="cuda")
    monkeypatch.setattr(loader, "fast_bf16", lambda device="cpu": False)
    assert resolve_dtype("auto") == "fp16w"
    assert resolve_dtype("auto", inference=False) == "fp32"  # packed products have no backward
    assert resolve_dtype("fp32") == "fp32"


def test_tensor_parallel_shards_before_packing(tiny_llama):
    from workers.models.tp import apply_tensor_parallel

    with pytest.raises(ValueError, match="shard the model before packing"):
        apply_tensor_parallel(load_model(str(tiny_llama), "fp16w").model, 0, 2)
    m = load_model(str(tiny_llama), "fp16w", pack=False).model
    assert m.packed_lm_head is None and any(isinstance(mod, nn.Linear) for mod in m.modules())


def _run(target, drafter, k):
    ids = [target.tokenizer.encode(p) for p in PROMPTS]
    engine = SpecEngine(target, InProcessDraftClient(drafter) if drafter else None, max_batch=4, max_model_len=256)
    return [s.output_ids for s in engine.run([Request(f"r{i}", p, max_tokens=30, num_draft_tokens=k,
                                                      ignore_eos=True) for i, p in enumerate(ids)])]


@pytest.mark.parametrize("draft", ["ngram", "model"])
def test_speculation_on_an_fp16w_target_is_exact(tiny_llama, tiny_draft, draft):
    """Greedy output with a drafter equals the fp16w target's own greedy output, batch 4, k = 4."""
    from workers.drafters.registry import build_drafter

    target = load_model(str(tiny_llama), "fp16w")
    spec = "ngram" if draft == "ngram" else f"model:{tiny_draft}"
    drafter = build_drafter(spec, target, dtype="fp16w", max_batch=4, max_model_len=256)
    if draft == "model":
        assert drafter.model.packed_lm_head is not None  # the draft model is packed too
    assert _run(target, drafter, 4) == _run(target, None, 0)
