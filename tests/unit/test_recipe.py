"""The shipped drafters' recipe runs end to end (data, a --resume pass, training of all three heads, then stage 2:
fresh data and a fine-tune from stage 1's heads) on a tiny target with tiny budgets: every flag it passes is one
the CLI takes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RECIPE = Path(__file__).resolve().parents[2] / "training" / "recipes" / "smollm2-135m.sh"


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_recipe_runs_on_a_tiny_target(tiny_llama, tmp_path):
    env = dict(os.environ, TARGET=str(tiny_llama), DATA_S="15", MORE_S="8", FEATURE_CACHE="1", TRAIN_MIN="0.05",
               FT_DATA_S="8", FT_MIN="0.05",
               SPECRAY=f"{sys.executable} -m cluster.cli", PYTHONUNBUFFERED="1")
    out = tmp_path / "run"
    proc = subprocess.run(["bash", str(RECIPE), str(out)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=RECIPE.parents[2])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["arguments"]["resume"] and meta["earlier_runs"]  # the second pass resumed the first
    assert meta["counts"]["rows"] > 0
    for kind in ("dspark", "eagle", "mtp1"):
        cfg = json.loads((out / kind / "config.json").read_text())
        assert cfg["kind"] == kind and (out / kind / "model.safetensors").stat().st_size > 0
    assert list((out / "feature-cache").glob("batch-*.safetensors"))
    ft_meta = json.loads((out / "data-ft" / "meta.json").read_text())
    assert ft_meta["arguments"]["seed"] == 1 and ft_meta["counts"]["rows"] > 0  # a fresh draw of prompts
    for kind in ("dspark", "eagle", "mtp1"):  # stage 2 continued from stage 1's heads
        args = json.loads((out / "ft" / kind / "training_args.json").read_text())
        assert args["init"] == str(out) and args["data"] == str(out / "data-ft")
        assert (out / "ft" / kind / "model.safetensors").read_bytes() != (out / kind / "model.safetensors").read_bytes()
    assert not (out / "feature-cache-ft").exists()  # stage 2's cache is deleted at the end


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_recipe_stage2_can_resume_stage1_prompts(tiny_llama, tmp_path):
    """FT_RESUME=1 (the GPU default): stage 2 answers the rest of stage 1's prompts into the same data directory and
    fine-tunes on all of it, with no fresh draw."""
    env = dict(os.environ, TARGET=str(tiny_llama), DATA_S="10", TRAIN_MIN="0.05", FT_DATA_S="8", FT_MIN="0.05",
               FT_RESUME="1", SPECRAY=f"{sys.executable} -m cluster.cli", PYTHONUNBUFFERED="1")
    out = tmp_path / "run"
    proc = subprocess.run(["bash", str(RECIPE), str(out)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=RECIPE.parents[2])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["arguments"]["resume"] and meta["earlier_runs"]  # stage 2 resumed stage 1's data
    assert not (out / "data-ft").exists()
    for kind in ("dspark", "eagle", "mtp1"):
        args = json.loads((out / "ft" / kind / "training_args.json").read_text())
        assert args["init"] == str(out) and args["data"] == str(out / "data")
