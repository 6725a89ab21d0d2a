"""The cluster/ configs parse and hold the fields cluster/README.md's commands rely on.

Fast, no network: YAML parsing, a few string checks and (where Ray is installed)
Ray's own cluster-config validation and working_dir exclude matching.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"

YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
TEXT_FILES = sorted(p for p in CLUSTER.rglob("*")
                    if p.is_file() and p.suffix not in (".pyc",) and "__pycache__" not in p.parts)


def load_docs(path: Path) -> list:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def load_one(path: Path) -> dict:
    docs = load_docs(path)
    assert len(docs) == 1, f"{path.name}: expected one YAML document, found {len(docs)}"
    assert isinstance(docs[0], dict)
    return docs[0]


def docs_of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p in YAML_FILES for d in load_docs(p) if isinstance(d, dict) and d.get("kind") == kind]


def is_cron_schedule(s: str) -> bool:
    fields = s.split()
    field = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")
    return len(fields) == 5 and all(field.match(f) for f in fields)


# --- every file -----------------------------------------------------------------------------

def test_cluster_dir_has_the_documented_files():
    for name in ("ray-cluster.yaml", "runtime_env.yaml", "crontab", "README.md", "Dockerfile",
                 "kuberay/raycluster.yaml", "kuberay/rayjob-score.yaml", "kuberay/audit-cronjob.yaml"):
        assert (CLUSTER / name).is_file(), f"cluster/{name} is missing"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path):
    docs = load_docs(path)
    assert docs, f"{path} has no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: top level must be a mapping"


def test_every_jobs_module_named_in_cluster_exists():
    """Every `python -m jobs.X` and `python cluster/X.py` in cluster/ is a file in the repo."""
    modules, scripts = set(), set()
    for path in TEXT_FILES:
        text = path.read_text(errors="replace")
        modules.update(re.findall(r"python3? -m (jobs(?:\.[a-z_][a-z0-9_]*)+)", text))
        scripts.update(re.findall(r"python3? (cluster/[\w/.-]+\.py)", text))
    assert "jobs.score" in modules and "jobs.audit" in modules
    missing = sorted(m for m in modules if not (ROOT / (m.replace(".", "/") + ".py")).is_file())
    missing += sorted(s for s in scripts if not (ROOT / s).is_file())
    assert not missing, f"named in cluster/ but not in the repository: {missing}"


def test_readme_commands_name_existing_files():
    text = (CLUSTER / "README.md").read_text()
    for cmd in ("ray up -y cluster/ray-cluster.yaml", "--runtime-env cluster/runtime_env.yaml",
                "kubectl apply -f cluster/kuberay/raycluster.yaml",
                "kubectl apply -f cluster/kuberay/rayjob-score.yaml",
                "kubectl apply -f cluster/kuberay/audit-cronjob.yaml", "crontab cluster/crontab",
                "docker build -f cluster/Dockerfile"):
        assert cmd in text, f"cluster/README.md lacks `{cmd}`"
    for ref in set(re.findall(r"\b(cluster/[\w/.-]+\.(?:ya?ml|py))\b", text)) | {"cluster/crontab"}:
        assert (ROOT / ref).is_file(), f"cluster/README.md names {ref}, which does not exist"


# --- ray-cluster.yaml (ray up) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def launcher():
    return load_one(CLUSTER / "ray-cluster.yaml")


def test_ray_cluster_shape(launcher):
    assert launcher["cluster_name"]
    assert launcher["provider"]["type"] == "aws" and launcher["provider"]["region"]
    types = launcher["available_node_types"]
    head = launcher["head_node_type"]
    assert head in types
    assert types[head]["resources"].get("GPU", 0) == 0
    assert types[head]["resources"].get("CPU", 0) <= 2, "scoring work should not land on the head"
    gpu_workers = {k: t for k, t in types.items() if k != head and t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_workers, "no worker type declares GPU resources"
    for name, t in gpu_workers.items():
        assert t.get("min_workers", 0) >= 0 and t["max_workers"] > 0, name
        assert t["node_config"]["InstanceType"]
    cpu_workers = {k: t for k, t in types.items() if k != head and t.get("resources", {}).get("GPU", 0) == 0
                   and t.get("resources", {}).get("CPU", 0) >= 4}
    assert cpu_workers, "no CPU worker type for the read/decode and publish tasks"
    assert all(t["max_workers"] > 0 and t.get("min_workers", 0) == 0 for t in cpu_workers.values())
    assert launcher["max_workers"] > 0
    assert launcher["head_start_ray_commands"] and launcher["worker_start_ray_commands"]
    assert any("--head" in c for c in launcher["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in launcher["worker_start_ray_commands"])


def test_ray_cluster_installs_the_project(launcher):
    mounts = launcher["file_mounts"]
    assert mounts.get("~/headclip") in (".", "./"), "the repository must be mounted at ~/headclip"
    installs = [c for c in launcher["setup_commands"] if "pip install" in c]
    assert any("-e ~/headclip" in c and "-c ~/headclip/constraints.txt" in c for c in installs), installs
    assert (ROOT / "pyproject.toml").is_file() and (ROOT / "constraints.txt").is_file()
    excluded = set(launcher.get("rsync_exclude", []))
    assert {".venv", ".git"} <= excluded and any("demo-data" in e for e in excluded)


def test_ray_cluster_passes_rays_own_validation(launcher):
    util = pytest.importorskip("ray.autoscaler._private.util")
    config = util.prepare_config(yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text()))
    util.validate_config(config)  # Ray's JSON schema and node-type checks; raises on error


# --- KubeRay ---------------------------------------------------------------------------------

def container_gpus(container: dict) -> float:
    res = container.get("resources", {})
    return float(res.get("limits", {}).get("nvidia.com/gpu", 0))


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    head = spec["headGroupSpec"]
    head_containers = head["template"]["spec"]["containers"]
    assert head_containers and head_containers[0]["image"], where
    assert str(head.get("rayStartParams", {}).get("num-cpus", "0")) == "0", f"{where}: head should not score"
    assert all(container_gpus(c) == 0 for c in head_containers), where
    ports = {p["containerPort"] for p in head_containers[0].get("ports", [])}
    assert 8265 in ports, f"{where}: the job API port"
    groups = spec["workerGroupSpecs"]
    gpu_groups = [g for g in groups if any(container_gpus(c) >= 1 for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, f"{where}: no worker group requests nvidia.com/gpu"
    cpu_groups = [g for g in groups if g not in gpu_groups]
    assert cpu_groups, f"{where}: no CPU worker group for the read/decode and publish tasks"
    for g in gpu_groups + cpu_groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], where
        assert g["maxReplicas"] > 0, where
    assert spec.get("rayVersion")


def test_raycluster_manifest():
    doc = load_one(KUBERAY / "raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"] == "headclip"  # the audit CronJob submits to headclip-head-svc
    spec = doc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    check_ray_cluster_spec(spec, "raycluster.yaml")
    gpu = spec["workerGroupSpecs"][0]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] == 8


def test_rayjob_score_manifest():
    doc = load_one(KUBERAY / "rayjob-score.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    entrypoint = spec["entrypoint"]
    assert entrypoint.startswith("python -m jobs.score")
    args = shlex.split(entrypoint)
    assert "--input" in args and "--output" in args
    from jobs.score import build_parser

    parsed = build_parser().parse_args(args[3:])  # the flags as the job reads them (a removed one exits 2)
    assert parsed.gpus_per_actor == 1.0
    from jobs.cli import pool_settings

    assert pool_settings(parsed)["gpus_per_actor"] == 1.0  # what the job's JobConfig gets
    assert (ROOT / "jobs" / "score.py").is_file()
    assert spec["shutdownAfterJobFinishes"] is True
    check_ray_cluster_spec(spec["rayClusterSpec"], "rayjob-score.yaml")


def cronjob_command(doc: dict) -> str:
    container = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    return " ".join(container.get("command", []) + container.get("args", []))


def test_audit_cronjob_manifest():
    cronjobs = docs_of_kind("CronJob")
    assert cronjobs, "no CronJob under cluster/"
    for path, doc in cronjobs:
        assert doc["apiVersion"] == "batch/v1", path
        assert is_cron_schedule(doc["spec"]["schedule"]), doc["spec"]["schedule"]
        job = doc["spec"]["jobTemplate"]["spec"]
        assert job["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")
        cmd = cronjob_command(doc)
        assert "python -m jobs.audit" in cmd and "--history" in cmd, cmd
        assert "ray job submit" in cmd and "headclip-head-svc:8265" in cmd
        # exit 3 (alert) must fail the Job: nothing may swallow the exit status
        assert "|| true" not in cmd and "; true" not in cmd
    (path, doc), = [(p, d) for p, d in cronjobs if p.name == "audit-cronjob.yaml"]
    assert doc["spec"]["schedule"] == "30 2 * * *"


def test_raycronjob_alternative_if_present():
    for path, doc in docs_of_kind("RayCronJob"):
        assert doc["apiVersion"] == "ray.io/v1"
        assert is_cron_schedule(doc["spec"]["schedule"])
        template = doc["spec"]["jobTemplate"]
        assert template["entrypoint"].startswith("python -m jobs.audit") and "--history" in template["entrypoint"]
        from jobs.audit import build_parser

        entrypoint = template["entrypoint"].replace('"$(date -u -d yesterday +%F)"', "2026-01-01")  # as the shell does
        parsed = build_parser().parse_args(shlex.split(entrypoint)[3:])  # a removed flag exits 2
        assert parsed.history
        check_ray_cluster_spec(template["rayClusterSpec"], path.name)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a mapping with a key twice (safe_load keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        assert len(keys) == len(set(keys)), f"duplicate keys at line {node.start_mark.line + 1}: {keys}"
        return super().construct_mapping(node, deep)


def _has_token_auth(container: dict) -> bool:
    env = {e["name"]: e for e in container.get("env", [])}
    token = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    return (env.get("RAY_AUTH_MODE", {}).get("value") == "token"
            and (token.get("name"), token.get("key")) == ("headclip-ray-auth", "auth_token"))


def _ray_cluster_containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_manifests_carry_token_auth():
    """Ray 2.60 with RAY_AUTH_MODE=token on the cluster refuses unauthenticated `ray job submit`:
    every Ray container and every submitter (KubeRay's, the CronJob's) has the mode and the token
    from one Secret."""
    for path in sorted(KUBERAY.glob("*.yaml")):
        yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        doc = load_one(path)
        assert "kubectl create secret generic headclip-ray-auth" in path.read_text(), path.name
        spec = doc["spec"]
        if doc["kind"] == "RayCluster":
            containers = _ray_cluster_containers(spec)
        elif doc["kind"] in ("RayJob", "RayCronJob"):
            job = spec if doc["kind"] == "RayJob" else spec["jobTemplate"]
            submitter = job["submitterPodTemplate"]["spec"]["containers"]
            containers = _ray_cluster_containers(job["rayClusterSpec"]) + submitter
        else:
            containers = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"]
            assert "ray job submit" in cronjob_command(doc)
        assert containers and all(_has_token_auth(c) for c in containers), (path.name, containers)


# --- runtime_env.yaml ------------------------------------------------------------------------

def gitignore_style_excluded(relpath: str, patterns: list[str]) -> bool:
    """Rough gitignore matching with fnmatch: a pattern matches the path, one of its parent
    directories, or (without a slash in it) any single path component; later `!` patterns
    re-include. Ray uses gitwildmatch, which this approximates from the safe side."""
    parts = relpath.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pat = raw[1:] if negate else raw
        pat = pat.rstrip("/").lstrip("/")
        if pat.startswith("**/"):
            pat = pat[3:]
        candidates = prefixes if "/" in pat else parts
        hit = any(fnmatch.fnmatch(c, pat) for c in candidates)
        if "/" in pat and not hit:
            hit = any(fnmatch.fnmatch("/".join(parts[i:]), pat) for i in range(len(parts)))
        if hit:
            excluded = not negate
    return excluded


@pytest.fixture(scope="module")
def runtime_env():
    return load_one(CLUSTER / "runtime_env.yaml")


KEPT = ["headclip/assets/demo.safetensors", "headclip/assets/demo-backbone.safetensors",
        "headclip/assets/example.png", "headclip/model_configs/HeadCLIP-Tiny.json",
        "headclip/scorer.py", "jobs/score.py", "jobs/__init__.py", "pyproject.toml",
        "constraints.txt", "cluster/wait_for_gpus.py"]
DROPPED = [".venv/lib/python3.11/site-packages/torch/__init__.py", ".git/HEAD", "demo-data/images/wood/0001.png",
           "demo-data/manifest.csv", "out/demo/run_id=x/shard-00000.parquet", "train-runs/run1/model.safetensors",
           "headclip/__pycache__/scorer.cpython-311.pyc", "headclip.egg-info/PKG-INFO",
           ".pytest_cache/v/cache/nodeids", "scores/part-0.parquet", "samples/a.jpg", "x/y/scan.tif"]


def test_runtime_env_fields(runtime_env):
    assert runtime_env["working_dir"] == "."
    excludes = runtime_env["excludes"]
    assert any(e.strip("/") == ".venv" for e in excludes) and any(e.strip("/") == "demo-data" for e in excludes)
    # the cluster's image has torch & co.: nothing may reinstall them per job
    for key in ("pip", "uv", "conda", "py_modules", "py_executable"):
        assert key not in runtime_env, f"runtime_env must not set {key}"
    assert all(isinstance(v, str) for v in runtime_env.get("env_vars", {}).values())


@pytest.mark.parametrize("path", KEPT)
def test_runtime_env_keeps_code_and_package_assets(runtime_env, path):
    assert not gitignore_style_excluded(path, runtime_env["excludes"]), f"{path} would not be uploaded"


@pytest.mark.parametrize("path", DROPPED)
def test_runtime_env_drops_data_and_environments(runtime_env, path):
    assert gitignore_style_excluded(path, runtime_env["excludes"]), f"{path} would be uploaded"


def test_runtime_env_with_rays_own_matcher(runtime_env):
    pathspec = pytest.importorskip("ray._private.thirdparty.pathspec")
    spec = pathspec.PathSpec.from_lines("gitwildmatch", runtime_env["excludes"])
    for path in KEPT:
        assert not spec.match_file(path), f"Ray would not upload {path}"
    for path in DROPPED:
        assert spec.match_file(path), f"Ray would upload {path}"


# --- crontab ---------------------------------------------------------------------------------

def test_crontab_line():
    lines = [ln for ln in (CLUSTER / "crontab").read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    env_lines = [ln for ln in lines if re.match(r"^\s*[A-Za-z_][A-Za-z0-9_]*\s*=", ln)]
    jobs = [ln for ln in lines if ln not in env_lines]
    assert len(jobs) == 1, f"expected exactly one crontab entry, found {len(jobs)}"
    fields = jobs[0].split(None, 5)
    assert len(fields) == 6 and is_cron_schedule(" ".join(fields[:5])), jobs[0][:80]
    command = fields[5]
    assert "python -m jobs.audit" in command and "--history" in command
    assert "ray job submit" in command and "RAY_ADDRESS=" in command
    # cron turns a bare % into a newline: every % in the command must be escaped
    assert not re.search(r"(?<!\\)%", command), "unescaped % in the crontab command"
