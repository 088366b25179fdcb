"""Tensor parallelism (workers/models/tp.py + workers/engine/tp_group.py) against the unsplit model.

Without processes: the shard arithmetic (uneven splits, SmolLM2's 9 query / 3 KV heads over 2 ranks), and that the
shards of every rank put back together are the original weights (row-parallel partial sums add up to the full
layer). With processes: world 2 on 127.0.0.1 over gloo, one spawned process per rank (one intra-op thread each,
every process bounded by a timeout and killed if it overruns; the leader always sends SHUTDOWN and every rank
destroys its process group):
  * logits and hidden states of TP=2 equal TP=1 (fp32, atol 1e-4) through prefill with padded rows, verify-style
    steps with rollbacks, non-contiguous slots and single-token decode, for llama, qwen2 (q/k/v biases), qwen3
    (q/k norms), gemma3 (sliding window, sandwich norms) and a llama with 3 KV heads (uneven split [1, 2]);
  * a whole greedy generation through `SpecEngine` with an ngram drafter (k = 3) is token-identical at TP=2 and
    TP=1, with continuous batching and rejected drafts (so rollbacks) along the way.
"""

from __future__ import annotations

import copy
import json
import multiprocessing.connection
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from workers.drafters.ngram import NgramDrafter
from workers.engine.draft_client import InProcessDraftClient
from workers.engine.engine import SpecEngine
from workers.engine.sequence import Request
from workers.engine.tp_group import TPLeader, follower_loop, init_process_group
from workers.models.config import ModelArgs
from workers.models.loader import load_model
from workers.models.tp import apply_tensor_parallel, plan_shard, split_sizes
from workers.models.packed import fp16w_supported, pack_fp16_weights
from workers.wire import free_port

pytestmark = pytest.mark.usefixtures("torch_single_thread")

WORLD = 2
TIMEOUT_S = 240  # per spawned world, generous for a loaded 2-core machine (a run takes ~15 s)
NUM_SLOTS, CAPACITY = 3, 48
PROMPTS = ["The quick brown fox", "def add(a, b):", "Hello world! How are you", "1 + 1 = 2, 2 + 2 =",
           "The lazy dog jumps over the quick brown fox. The lazy", "a"]
MAX_TOKENS, K, MAX_BATCH, MAX_MODEL_LEN = 24, 3, 4, 128


@pytest.fixture(scope="module")
def uneven_llama(tiny_llama, tmp_path_factory) -> Path:
    """A tiny llama with 6 query heads over 3 KV heads and an odd intermediate size: with world 2 the KV heads
    split [1, 2] (query heads [2, 4]) and the MLP [49, 50], the same shape of split as SmolLM2-135M's."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = tmp_path_factory.mktemp("tiny-uneven") / "llama"
    cfg = LlamaConfig(vocab_size=384, hidden_size=48, intermediate_size=99, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=3, head_dim=16, max_position_embeddings=1024,
                      rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, initializer_range=0.2, rope_theta=10000.0)
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(cfg).float().save_pretrained(out)
    for f in tiny_llama.iterdir():  # same tokenizer as the other tiny models
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


# ------------------------------------------------------------------------------------ the shard arithmetic


def test_split_sizes_are_even_with_remainders_on_the_last_ranks():
    assert split_sizes(3, 2) == [1, 2]
    assert split_sizes(9, 2) == [4, 5]
    assert split_sizes(1536, 2) == [768, 768]
    assert split_sizes(10, 4) == [2, 2, 3, 3]


def test_smollm2_heads_split_by_kv_group():
    args = ModelArgs(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                     num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=8192)
    r0, r1 = plan_shard(args, 0, 2), plan_shard(args, 1, 2)
    assert (r0.kv_heads, r0.heads, r0.ffn) == ((0, 1), (0, 3), (0, 768))
    assert (r1.kv_heads, r1.heads, r1.ffn) == ((1, 3), (3, 9), (768, 1536))  # query heads follow their KV head
    with pytest.raises(ValueError, match="at most 3 ranks"):
        plan_shard(args, 0, 4)


def test_shards_reassemble_the_unsplit_layers(uneven_llama):
    full = load_model(str(uneven_llama)).model
    shards = [apply_tensor_parallel(copy.deepcopy(full), r, WORLD) for r in range(WORLD)]
    assert [m.args.num_kv_heads for m in shards] == [1, 2]
    assert [m.args.num_heads for m in shards] == [2, 4]
    assert [m.new_cache(2, 8).k[0].shape[1] for m in shards] == [1, 2]  # the cache holds local KV heads only
    for i, layer in enumerate(full.layers):
        attn = [m.layers[i].self_attn for m in shards]
        mlp = [m.layers[i].mlp for m in shards]
        for name in ("q_proj", "k_proj", "v_proj"):
            torch.testing.assert_close(torch.cat([getattr(a, name).weight for a in attn]),
                                       getattr(layer.self_attn, name).weight, atol=0, rtol=0)
        torch.testing.assert_close(torch.cat([m.gate_proj.weight for m in mlp]), layer.mlp.gate_proj.weight)
        # row-parallel: each rank's partial product over its input slice; the all-reduce would sum them
        hd = full.args.head_dim
        x = torch.randn(2, 3, full.args.num_heads * hd)  # [B, T, n_heads * hd]
        partial = sum(F.linear(x[..., m.tp.heads[0] * hd: m.tp.heads[1] * hd], a.o_proj.weight)
                      for m, a in zip(shards, attn))
        torch.testing.assert_close(partial, layer.self_attn.o_proj(x), atol=1e-5, rtol=1e-5)
        h = torch.randn(2, 3, full.args.intermediate_size)  # [B, T, ffn]
        partial = sum(F.linear(h[..., m.tp.ffn[0]: m.tp.ffn[1]], b.down_proj.weight) for m, b in zip(shards, mlp))
        torch.testing.assert_close(partial, layer.mlp.down_proj(h), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already applied"):
        apply_tensor_parallel(shards[0], 0, WORLD)


# ----------------------------------------------------------------------------------- spawning a TP group


def _rank_main(rank: int, world: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)
    init_process_group(rank, world, "127.0.0.1", port, backend="gloo", timeout_s=TIMEOUT_S / 2)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _spawn_world(fn, *args) -> None:
    """Run fn(rank, WORLD, *args) in WORLD spawned processes; fail fast if one fails, kill all on timeout."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, WORLD, port, fn, args), name=f"tp-rank{r}", daemon=True)
             for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        pending = list(procs)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"tensor-parallel ranks {[p.name for p in pending]} still running after {TIMEOUT_S}s")
            multiprocessing.connection.wait([p.sentinel for p in pending], timeout=left)
            for p in [p for p in pending if not p.is_alive()]:
                p.join()
                assert p.exitcode == 0, f"{p.name} exited with {p.exitcode} (its traceback is in the stderr above)"
                pending.remove(p)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)


# ------------------------------------------------------------------------------- one world for both checks


def _world_rank(rank: int, world: int, dirs: dict[str, str], out: str) -> None:
    """Everything a rank does: the parity scenarios (one leader per model), then a SpecEngine run. Each job ends
    with the leader's SHUTDOWN, so the same process group carries several leaders in turn."""
    _parity_rank(rank, world, dirs, out)
    _engine_rank(rank, world, dirs["llama"], out)
    if fp16w_supported():
        _engine_rank(rank, world, dirs["llama"], out, dtype="fp16w")


@pytest.fixture(scope="module")
def tp_world(tiny_models, uneven_llama, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Spawn the TP=2 world once (process start-up and imports dominate its cost) and return its output files."""
    dirs = {name: str(tiny_models[name]) for name in ("llama", "qwen2", "qwen3", "gemma3")}
    dirs["uneven"] = str(uneven_llama)
    out = tmp_path_factory.mktemp("tp-world")
    t = time.perf_counter()
    _spawn_world(_world_rank, dirs, str(out))
    print(f"TP=2 world: {time.perf_counter() - t:.1f}s")
    return out, dirs


# --------------------------------------------------------------------------------------- logits parity


@torch.inference_mode()
def _scenario(forward, cache, vocab: int, sync=None, compact=None) -> list[torch.Tensor]:
    """The forward passes an engine makes, with rollbacks in between; returns every real output position."""
    g = torch.Generator().manual_seed(0)

    def toks(B, T):
        return torch.randint(vocab, (B, T), generator=g)

    outs = []
    # prefill two rows into slots 0 and 1; row 1 is padded (6 real tokens of 9)
    o = forward(toks(2, 9), cache, [0, 1], num_new=[9, 6], hidden_layers=(0, 1))
    outs += [o.logits[0], o.logits[1, :6], o.hidden[0], o.hidden[1, :6]]
    # verify k = 3 and k = 2 drafts; keep 2 and 1 positions (rejections roll the cache back)
    o = forward(toks(2, 4), cache, [0, 1], num_new=[4, 3])
    outs += [o.logits[0], o.logits[1, :3]]
    cache.rollback(0, 9 + 2)
    cache.rollback(1, 6 + 1)
    # a third sequence prefilled alone, last logits only
    outs.append(forward(toks(1, 12), cache, [2], logits="last").logits)
    # slots out of order (gathered, not sliced); overwrites slot 0's rejected positions
    o = forward(toks(2, 5), cache, [2, 0], num_new=[5, 3], hidden_layers=(1,))
    outs += [o.logits[0], o.logits[1, :3], o.hidden[0], o.hidden[1, :3]]
    cache.rollback(2, 12 + 1)
    # a token tree on slot 2, then its accepted path (row positions 0, 2, 3) moved into place: the last forward
    # below reads slot 2 through the compacted entries
    o = forward(toks(1, 6), cache, [2], tree=torch.tensor([[-1, 0, 0, 2, 1, -1]]))
    outs.append(o.logits[0])
    if compact is not None:
        compact(cache, 2, 13, [0, 2, 3])
    else:
        cache.compact(2, 13, [0, 2, 3])
    cache.rollback(2, 13 + 3)
    for _ in range(3):  # one token at a time: the mask-free B = 1, T = 1 path
        outs.append(forward(toks(1, 1), cache, [1]).logits)
    outs.append(forward(toks(3, 1), cache, [0, 1, 2]).logits)  # contiguous slots: a sliced read
    cache.rollback(2, 5)
    if sync is not None:
        sync(cache)
    return outs


def _parity_rank(rank: int, world: int, dirs: dict[str, str], out: str) -> None:
    for name, path in dirs.items():
        model = apply_tensor_parallel(load_model(path).model, rank, world)
        cache = model.new_cache(NUM_SLOTS, CAPACITY)
        record = {"lengths": list(cache.lengths), "kv_heads": cache.k[0].shape[1]}
        if rank == 0:
            leader = TPLeader(model)
            try:
                record["outs"] = _scenario(leader, cache, model.args.vocab_size, sync=leader.sync_lengths,
                                           compact=leader.compact)
                record["steps"] = leader.num_steps
            finally:
                leader.shutdown()
        else:
            record["counts"] = follower_loop(model, cache)
        record["lengths"] = list(cache.lengths)
        torch.save(record, Path(out) / f"{name}-{rank}.pt")


def test_tp2_logits_equal_tp1(tp_world):
    out, dirs = tp_world
    for name, path in dirs.items():
        model = load_model(path).model
        cache = model.new_cache(NUM_SLOTS, CAPACITY)
        ref = _scenario(model, cache, model.args.vocab_size)
        lead, follow = (torch.load(out / f"{name}-{r}.pt") for r in range(WORLD))
        assert len(lead["outs"]) == len(ref)
        for i, (got, want) in enumerate(zip(lead["outs"], ref)):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=lambda m: f"{name} output {i}: {m}")
        assert lead["lengths"] == cache.lengths
        assert follow["lengths"] == cache.lengths  # rollbacks reached the follower through SYNC_LENGTHS
        assert follow["counts"] == {"forward": lead["steps"], "sync_lengths": 1, "compact": 1}
        expected_kv = [1, 2] if name == "uneven" else [1, 1]
        assert [lead["kv_heads"], follow["kv_heads"]] == expected_kv


# ---------------------------------------------------------------------------------- SpecEngine over TP=2


def _requests(tokenizer) -> list[Request]:
    return [Request(seq_id=f"r{i}", prompt_ids=tokenizer.encode(p), max_tokens=MAX_TOKENS, num_draft_tokens=K,
                    ignore_eos=True) for i, p in enumerate(PROMPTS)]


def _engine(loaded, forward=None) -> SpecEngine:
    return SpecEngine(loaded, InProcessDraftClient(NgramDrafter()), max_batch=MAX_BATCH,
                      max_model_len=MAX_MODEL_LEN, max_draft_tokens=K, forward=forward)


def _summary(seqs) -> list[dict]:
    return [{"out": s.output_ids, "drafted": s.num_draft_tokens, "accepted": s.num_accepted_tokens} for s in seqs]


def _engine_rank(rank: int, world: int, path: str, out: str, dtype: str = "fp32") -> None:
    loaded = load_model(path, dtype, pack=False)
    apply_tensor_parallel(loaded.model, rank, world)
    if dtype == "fp16w":  # packed after the split, as a TP replica does
        pack_fp16_weights(loaded.model)
    if rank == 0:
        leader = TPLeader(loaded.model)
        try:
            seqs = _engine(loaded, forward=leader).run(_requests(loaded.tokenizer))
            result = {"seqs": _summary(seqs), "steps": leader.num_steps}
        finally:
            leader.shutdown()
    else:
        result = {"counts": follower_loop(loaded.model)}  # the cache is sized from the leader's first plan
    (Path(out) / f"engine-{dtype}-{rank}.json").write_text(json.dumps(result))


@pytest.mark.parametrize("dtype", ["fp32", "fp16w"])
def test_spec_engine_greedy_tp2_is_token_identical_to_tp1(tp_world, dtype):
    if dtype == "fp16w" and not fp16w_supported():
        pytest.skip("this torch build has no fbgemm (not x86-64)")
    out, dirs = tp_world
    loaded = load_model(dirs["llama"], dtype)
    ref = _summary(_engine(loaded).run(_requests(loaded.tokenizer)))
    drafted, accepted = sum(s["drafted"] for s in ref), sum(s["accepted"] for s in ref)
    assert 0 < accepted < drafted  # drafts both kept and rejected: the run exercises rollbacks
    lead, follow = (json.loads((out / f"engine-{dtype}-{r}.json").read_text()) for r in range(WORLD))
    assert lead["seqs"] == ref
    assert follow["counts"] == {"forward": lead["steps"], "sync_lengths": 0, "compact": 0}
    assert lead["steps"] > len(PROMPTS)
