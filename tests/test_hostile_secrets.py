"""Nothing the user passes as a secret is recorded or printed: training provenance, older checkpoints,
the redaction rules."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save as save_safetensors

SECRETS = ("AKIAHOSTILE0001", "s3cr3t-Hostile-Value", "tok-Hostile-9")


def _files_containing(root: Path, needles) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path.relative_to(root)}: {n}" for n in needles if n.encode() in data]
    return hits


def test_training_records_no_credentials(tmp_path, capsys):
    from jobs import train as train_job
    from jobs.make_synthetic import write_mvtec_tree

    from headclip.model.assets import DEMO_BACKBONE
    from headclip.model.checkpoint import read_checkpoint

    write_mvtec_tree(tmp_path / "data", ["metal"], per_class=4, size=64, seed=0)
    options = {"key": SECRETS[0], "secret": SECRETS[1], "token": SECRETS[2],
               "client_kwargs": {"region_name": "us-east-1"}}
    code = train_job.main(["--data", str(tmp_path / "data"), "--workers", "0", "--backbone", "HeadCLIP-Tiny",
                           "--pretrained", DEMO_BACKBONE, "--image-size", "64", "--epochs", "2", "--batch-size", "4",
                           "--storage-options", json.dumps(options), "--name", "secretive",
                           "--storage-path", str(tmp_path / "runs"), "--output", str(tmp_path / "out.safetensors")])
    assert code == 0
    # the final checkpoint and every per-epoch one (and anything else the run wrote) hold no secret
    assert _files_containing(tmp_path / "runs", SECRETS) == []
    assert _files_containing(tmp_path, SECRETS) == []
    assert not any(s in capsys.readouterr().out for s in SECRETS)
    provenance = read_checkpoint(str(tmp_path / "out.safetensors")).config.extra["provenance"]
    assert provenance.startswith("python -m jobs.train ") and "--storage-options" in provenance
    assert '"secret": "***"' in provenance and "us-east-1" in provenance  # redacted, not dropped
    epochs = sorted((tmp_path / "runs" / "secretive").glob("checkpoint_epoch_*/headclip.safetensors"))
    assert len(epochs) == 2
    assert read_checkpoint(str(epochs[0])).config.extra["provenance"] == provenance


def test_demo_prints_provenance_without_credentials_of_older_checkpoints(tiny_checkpoint, tmp_path):
    """A checkpoint written before provenance was redacted still prints without its secrets."""
    from safetensors import safe_open

    from jobs import demo

    with safe_open(tiny_checkpoint, "pt") as handle:
        payload = json.loads(handle.metadata()["headclip"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    payload["config"]["extra"] = {"provenance": (
        "python -m jobs.train --data s3://b/d --storage-options "
        f"'{json.dumps({'key': SECRETS[0], 'secret': SECRETS[1]})}' --api-token {SECRETS[2]} "
        f"--output https://user:{SECRETS[1]}@host/m.safetensors")}
    old = tmp_path / "old.safetensors"
    old.write_bytes(save_safetensors(tensors, metadata={"headclip": json.dumps(payload)}))
    printed = demo.provenance(str(old))
    assert not any(s in printed for s in SECRETS), printed
    assert printed.startswith("python -m jobs.train --data s3://b/d --storage-options")
    assert "https://***@host/m.safetensors" in printed


def test_redaction_rules():
    from headclip.redact import redact_command, redact_options, redact_text

    argv = ["--storage-options", json.dumps({"key": "K", "client_kwargs": {"endpoint_url": "http://m:9000",
                                                                          "aws_session_token": "T"}}),
            "--password=pw", "--api-key", "abc", "AWS_SECRET_ACCESS_KEY=zz", "--epochs", "3",
            "s3://AK:SK@bucket/x?X-Amz-Signature=sig&part=1"]
    out = redact_command(argv)
    assert json.loads(out[1]) == {"key": "***", "client_kwargs": {"endpoint_url": "http://m:9000",
                                                                  "aws_session_token": "***"}}
    assert out[2:] == ["--password=***", "--api-key", "***", "AWS_SECRET_ACCESS_KEY=***", "--epochs", "3",
                       "s3://***@bucket/x?X-Amz-Signature=***&part=1"]
    assert redact_options({"secret": "x", "anon": False, "nested": [{"token": "t"}]}) == \
        {"secret": "***", "anon": False, "nested": [{"token": "***"}]}
    assert redact_text("cannot read https://u:p@h/x.png: 403") == "cannot read https://***@h/x.png: 403"


def test_run_plans_hold_no_credentials_of_a_presigned_checkpoint_url(tiny_checkpoint, tmp_path):
    """A checkpoint read through a presigned URL: the plan (and with it every shard's metadata) keeps no signature."""
    import functools
    import http.server
    import threading

    from headclip.scoring.runner import JobConfig, prepare

    from .scoring_helpers import write_images

    served = tmp_path / "served"
    served.mkdir()
    (served / "tiny.safetensors").write_bytes(Path(tiny_checkpoint).read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = (f"http://127.0.0.1:{server.server_port}/tiny.safetensors"
               f"?X-Amz-Credential={SECRETS[0]}&X-Amz-Signature={SECRETS[1]}&X-Amz-Expires=300")
        write_images(tmp_path / "images", 2)
        plan = prepare(JobConfig(input=str(tmp_path / "images"), output=str(tmp_path / "out"), checkpoint=url))
    finally:
        server.shutdown()
    assert plan.config["checkpoint"].startswith(f"http://127.0.0.1:{server.server_port}/tiny.safetensors?")
    assert "X-Amz-Signature=***" in plan.config["checkpoint"] and "X-Amz-Expires=300" in plan.config["checkpoint"]
    assert _files_containing(tmp_path / "out", SECRETS) == []
