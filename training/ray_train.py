"""`specray train --ray-workers N`: the same training loop, data parallel over a Ray cluster (Ray Train).

Ray Train starts N workers (GPUs when `--device cuda`), sets up the torch process group among them, and each runs
`training.train.train`, which sees an initialised process group, takes every N-th batch and wraps the objective in
DDP, exactly as under torchrun. Rank 0 writes the checkpoint to `--out`, which must therefore be on storage the
rank-0 worker can write and the user can read (a shared filesystem on a real cluster; any path on one machine).
Connects to the cluster in `RAY_ADDRESS` when set, else starts a local one.
"""

from __future__ import annotations

import copy
import os


def _worker(config: dict) -> None:
    from ray import train as ray_train

    from training.train import train

    args = copy.copy(config["args"])
    result = train(args)
    ray_train.report({k: v for k, v in result.items() if isinstance(v, (int, float, str))})


def train_on_ray(args) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address) if address else ray.init(num_cpus=max(args.ray_workers, os.cpu_count() or 1))
    args = copy.copy(args)
    args.workers_for_ray = args.ray_workers
    args.ray_workers = 0  # inside a worker: plain (distributed) training
    args.func = None
    use_gpu = args.device.startswith("cuda")
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"args": args},
        scaling_config=ScalingConfig(num_workers=args.workers_for_ray,
                                     use_gpu=use_gpu),
        run_config=RunConfig(name=f"specray-train-{args.drafter}", storage_path=os.path.abspath(args.out) + "/ray"),
    )
    result = trainer.fit()
    return dict(result.metrics or {}, out=str(args.out), ray_workers=args.workers_for_ray)
