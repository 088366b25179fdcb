"""The serving configuration: strict at the edge (pydantic, unknown keys rejected), plain values inside.

One `SpecrayConfig` describes a whole deployment: the target pool (tensor-parallel replicas of the big model), the
draft pool (cheap replicas hosting a drafter) and the router. Each pool scales on its own: `num_replicas` or an
`autoscaling_config`, and custom Ray resources (`target`, `draft`) that pin its replicas to the matching node
pools of the Ray cluster (`deploy/cluster.yaml`, `deploy/kuberay/rayservice.yaml`). The builder in
`cluster/builder.py` turns it into the Ray Serve application.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


DEFAULT_MAX_QUEUED = 256  # target.max_queued: sequences a replica queues behind its running batch


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PoolScaling(_Strict):
    num_replicas: int | None = Field(1, ge=1, description="fixed replica count (ignored with autoscaling_config)")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Ray Serve autoscaling_config, e.g. {min_replicas: 1, max_replicas: 4, "
                          "target_ongoing_requests: 8}; target_ongoing_requests counts the sequences a replica "
                          "serves (cluster/autoscaling.py)")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per replica (per TP rank for the target pool)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (per TP rank for the target pool)")
    resources: dict[str, float] = Field(default_factory=dict,
                                        description="custom Ray resources per replica, e.g. {target: 1}")
    threads: int = Field(1, ge=1, description="torch threads inside each replica (Ray sets OMP_NUM_THREADS=1)")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="when a replica is removed (scale-down, redeploy): it leaves the registry so it gets "
                                "no new sequences, and its live ones get this long to finish")


class TargetPoolConfig(PoolScaling):
    model: str = Field("smollm2-135m", description="name, .gguf file, HF directory or cached HF id")
    dtype: str = Field("auto", pattern="^(auto|fp32|bf16|fp16|fp16w)$", description="auto: bf16 where the replica's "
                       "device multiplies bf16 natively (GPU, AVX512-BF16/AMX CPU), else fp16w on x86 CPUs (fp16 "
                       "weights, fp32 math), else fp32")
    tp: int = Field(1, ge=1, le=8, description="tensor-parallel ranks per replica (gloo on CPU, NCCL on GPU)")
    max_batch: int = Field(8, ge=1, description="sequences decoded together per replica")
    max_queued: int | None = Field(
        DEFAULT_MAX_QUEUED, ge=0, description="sequences a replica queues behind its max_batch running ones; past that it refuses "
                               "new ones (the router tries another replica, then answers 503 + Retry-After). "
                               "null: no bound")
    max_model_len: int = Field(4096, ge=16)
    num_draft_tokens: int = Field(4, ge=0, le=16, description="k: draft tokens verified per step")
    max_draft_wait_ms: float = Field(
        50.0, ge=0, description="a step waits at least this long for a missing draft block, longer (up to 1 s) "
                                "when blocks usually take longer")
    resources: dict[str, float] = Field(default_factory=lambda: {"target": 0.001})


class DraftPoolConfig(PoolScaling):
    drafter: str = Field("ngram", description="none | ngram[:N] | model:PATH | mtp1|eagle|dspark[:PATH] (no PATH: "
                         "the drafter shipped for the target)")
    dtype: str = Field("auto", pattern="^(auto|fp32|bf16|fp16|fp16w)$", description="of the draft model, or of the "
                       "target's LM head rows a learned drafter scores with; auto as for the target")
    max_sequences: int = Field(256, ge=1, description="sequences one draft replica serves at once")
    max_model_sequences: int = Field(16, ge=1, description="cap for drafters with a KV cache (model, learned): "
                                                           "each sequence holds a preallocated KV slot")
    ahead_blocks: int = Field(2, ge=1, le=8, description="blocks drafted past the last verdict (1 = no run-ahead)")
    min_confidence: float | None = Field(
        None, ge=0, le=1, description="eagle, dspark: end a draft after the token where its predicted survival "
                                      "falls below this (0 = full blocks; default: the drafter's own)")
    tree_width: int = Field(1, ge=1, le=8, description="mtp1, eagle, dspark: draft greedy token trees this wide "
                            "(1 = chains). In process the target verifies the tree in one tree-masked forward; "
                            "the draft pool streams trees whole and runs ahead on their first branch")
    max_hypotheses: int = Field(6, ge=0, le=64, description="blocks a draft replica prepares, while the target "
                                "verifies a block, for the verdicts that block is likely to get (0 = only run ahead "
                                "on the whole block accepted; needs ahead_blocks > 1)")
    num_cpus: float = Field(0.5, gt=0)
    resources: dict[str, float] = Field(default_factory=lambda: {"draft": 0.001})


class RouterConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    route_prefix: str = "/"
    api_key: str | None = Field(None, description="required as 'Authorization: Bearer KEY' when set")
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, gt=0)
    model_name: str | None = Field(None, description="name served at /v1/models (default: the target model)")
    request_timeout_s: float = Field(
        600.0, gt=0, description="a request still generating after this long is aborted on its target replica and "
                                 "answered 504 (an error event for a stream that already started)")


class TLSConfig(_Strict):
    """Mutual TLS on every gRPC hop (router -> target, target -> draft). The files must exist on every node (a
    Kubernetes secret mounted at the same path in each pod); `specray tls-certs --out DIR` writes a test set."""

    ca_file: str = Field(description="PEM certificate(s) of the CA that signs every worker's certificate")
    cert_file: str = Field(description="PEM certificate this node presents, as server and as client")
    key_file: str = Field(description="PEM private key of cert_file")
    server_name: str = Field("specray", min_length=1,
                             description="a DNS name in every certificate's subjectAltName; clients verify it "
                                         "instead of the IP address they dial")

    def load(self):
        """The files read and checked (workers.wire.GrpcTLS); a clear ValueError if one is missing or not PEM."""
        from workers.wire import GrpcTLS

        return GrpcTLS.from_files(self.ca_file, self.cert_file, self.key_file, self.server_name)


class SpecrayConfig(_Strict):
    name: str = "specray"
    advertise_host: str = Field(
        "127.0.0.1", description="address workers publish for their gRPC servers: 127.0.0.1 on one machine, "
                                 "'auto' (the Ray node IP) on a multi-node cluster")
    target: TargetPoolConfig = Field(default_factory=TargetPoolConfig)
    draft: DraftPoolConfig = Field(default_factory=DraftPoolConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    tls: TLSConfig | None = Field(None, description="mutual TLS between router, target and draft workers")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or not v.replace("-", "").replace("_", "").isalnum():
            raise ValueError("name must be alphanumeric (dashes and underscores allowed)")
        return v

    def grpc_tls(self):
        """The `tls` section's files read and checked (workers.wire.GrpcTLS), or None without one."""
        return self.tls.load() if self.tls else None

    @property
    def served_model_name(self) -> str:
        return self.router.model_name or self.target.model


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> SpecrayConfig:
    """Read a YAML/JSON config file (or defaults) and apply dotted overrides like {"target.tp": 2}."""
    import yaml

    data: dict[str, Any] = {}
    if path:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config must be a mapping")
        if "specray" in data and isinstance(data["specray"], dict):
            data = data["specray"]
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return SpecrayConfig.model_validate(data)
