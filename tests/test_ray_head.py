"""A real Ray head with the job API, started from the project's environment with README's commands.

The commands between README's ``ray-head`` markers run as written, with free
ports, a temporary directory, a temporary HOME (so the token is the test's own)
and the node on 127.0.0.1. ``ray stop`` would stop every Ray on the machine, so
the test stops only the processes of its own head. A small scoring job goes
through ``JobSubmissionClient``; its status, logs, rows and provenance are checked.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from headclip.model.assets import DEMO_CHECKPOINT
from headclip.model.checkpoint import checkpoint_id
from tests.scoring_helpers import write_images

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = BIN / "ray"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def readme_commands() -> list[str]:
    """README's ray-head block, one command per entry (continuations joined, comments dropped)."""
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- ray-head:start -->")[1].split("<!-- ray-head:end -->")[0]
    code = re.search(r"```bash\n(.*?)```", block, re.S).group(1).replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in code.splitlines() if line.strip()]


def _own_processes(marker: str) -> list[int]:
    """Pids of processes whose command line names ``marker`` (this head's temporary directory)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return [pid for pid in pids if pid != os.getpid()]


def _stop_head(group: int, marker: str) -> None:
    """Stop this head only: its process group, then anything still naming its directory."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            pass
        for pid in _own_processes(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 3
        while _own_processes(marker) and time.time() < deadline:
            time.sleep(0.2)
        if not _own_processes(marker):
            return


@pytest.fixture()
def head(tmp_path):
    """README's head, started from the project's environment; yields (env, dashboard URL, token, gcs)."""
    if not RAY.exists():
        pytest.skip("the ray command is not in this environment")
    commands = readme_commands()
    base = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths must stay short
    temp = base / "ray"  # where a Ray with RAY_TMPDIR=base looks for the latest `ray start`
    home = tmp_path / "home"
    home.mkdir()
    gcs, dashboard = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(home), PATH=f"{BIN}:{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0")
    group = None
    try:
        for command in commands:
            if command.startswith("export "):
                name, value = command[len("export "):].split("=", 1)
                env[name] = value
            elif command.startswith("ray get-auth-token"):
                subprocess.run(shlex.split(command), env=env, check=True, capture_output=True, timeout=60)
            elif command.startswith("ray start"):
                assert command.endswith("&") and "--block" in command, command  # a head `kill` stops
                argv = shlex.split(command.rstrip("&").replace("6379", str(gcs)).replace("8265", str(dashboard)))
                argv += [f"--temp-dir={temp}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                         "--num-cpus=2", f"--ray-client-server-port={_free_port()}",
                         f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats"]
                log = tmp_path / "ray-start.log"
                with open(log, "w") as sink:  # a file, not a pipe: the daemons it starts outlive it
                    started = subprocess.Popen(argv, env=env, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                                               start_new_session=True)
                group = started.pid
                deadline = time.time() + 120
                while "Ray runtime started" not in log.read_text():
                    assert started.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                    time.sleep(0.5)
            elif command.startswith("kill "):
                assert command == "kill $RAY_HEAD" and "RAY_HEAD=$!" in commands, command

        def stop() -> list[int]:
            """README's `kill $RAY_HEAD`: SIGTERM to `ray start --block`; the head's processes still alive after."""
            started.send_signal(signal.SIGTERM)
            started.wait(timeout=120)
            deadline = time.time() + 60
            while _own_processes(str(base)) and time.time() < deadline:
                time.sleep(0.5)
            return _own_processes(str(base))

        token = (home / ".ray" / "auth_token").read_text().strip()
        yield env, f"http://127.0.0.1:{dashboard}", token, f"127.0.0.1:{gcs}", base, stop
    finally:
        if group is not None:
            _stop_head(group, str(base))
        shutil.rmtree(base, ignore_errors=True)


def _job_api(url: str, token: str):
    """A JobSubmissionClient with the token; the job API can take a few seconds after `ray start`."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 60
    while True:
        try:
            return JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})
        except Exception:  # noqa: BLE001 - not up yet
            if time.time() > deadline:
                raise
            time.sleep(1)


@pytest.mark.own_ray
def test_readme_head_runs_a_scoring_job_through_the_job_api(head, tmp_path):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    env, url, token, gcs, base, stop = head
    client = _job_api(url, token)
    with pytest.raises(AuthenticationError):  # token authentication is on: no token, no job API
        JobSubmissionClient(url, headers={"Authorization": "Bearer not-the-token"}).list_jobs()

    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images, 4)
    submit = next(c for c in readme_commands() if c.startswith("ray job submit"))
    entrypoint = submit.split(" -- ", 1)[1].replace("demo-data/images", str(images)).replace("out/scores", str(out))
    flags = shlex.split(submit.split(" -- ", 1)[0])
    runtime_env = yaml.safe_load((REPO / flags[flags.index("--runtime-env") + 1]).read_text())
    runtime_env["working_dir"] = str(REPO / flags[flags.index("--working-dir") + 1])
    job = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)

    # meanwhile: run directly, a job starts a private Ray even though this head is the machine's latest
    # `ray start` (Ray's own default would join it)
    probe = ("import ray; from jobs.cli import init_ray; init_ray(None); "
             "print('GCS', ray.get_runtime_context().gcs_address); ray.shutdown()")
    direct = subprocess.Popen([sys.executable, "-c", probe], env={**env, "RAY_TMPDIR": str(base)}, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    port = gcs.rsplit(":", 1)[1]
    assert re.search(rf"Connecting to existing Ray cluster at address: [0-9.]+:{port}\b", logs), logs[-3000:]
    run_dir = next(out.glob("run_id=*"))
    assert f"run {run_dir.name[len('run_id='):]}: 4 images in 1 shards" in logs

    # provenance names the packaged checkpoint, not the session's copy of it
    plan = json.loads((run_dir / "_plan" / "plan.json").read_text())
    assert plan["config"]["checkpoint"] == "headclip:demo.safetensors"
    assert plan["checkpoint_id"] == checkpoint_id(DEMO_CHECKPOINT.read_bytes())
    shard = pq.ParquetFile(next(run_dir.glob("shard-*.parquet")))
    config = json.loads(shard.schema_arrow.metadata[b"headclip.run_config"])
    assert config["checkpoint"] == "headclip:demo.safetensors" and str(base) not in json.dumps(config)
    assert shard.metadata.num_rows == 4

    stdout, stderr = direct.communicate(timeout=120)
    address = re.search(r"^GCS (\S+)$", stdout, re.M)
    assert address, stdout[-2000:] + stderr[-2000:]
    assert not address.group(1).endswith(f":{port}")

    # README's `kill $RAY_HEAD` stops this head, all of it (its processes are the ones naming its directory)
    assert _own_processes(str(base)) and stop() == []
