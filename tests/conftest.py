"""Shared fixtures: a tiny random-weight model and a moto S3 server on 127.0.0.1."""

from __future__ import annotations

import os
import socket

import pytest
import torch

import headclip

TINY = dict(backbone="HeadCLIP-Tiny", pretrained=None, image_size=64)


def tiny_config(**changes) -> headclip.HeadCLIPConfig:
    return headclip.HeadCLIPConfig(**{**TINY, **changes})


@pytest.fixture(scope="session")
def tiny_model() -> headclip.HeadCLIP:
    torch.set_num_threads(2)
    return headclip.create_model(tiny_config())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server; yields the fsspec storage options that reach it."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    yield options
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server, request):
    """A fresh bucket for one test; yields (s3://bucket, storage_options)."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    client = boto3.client(
        "s3",
        endpoint_url=s3_server["client_kwargs"]["endpoint_url"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=name)
    return f"s3://{name}", s3_server


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (2 CPUs), never a cluster found on the machine; yields its address."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A tiny checkpoint at 64 px with perturbed prompts and head weights."""
    model = headclip.create_model(tiny_config())
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in model.learnable_parameters().values():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    headclip.save_checkpoint(model, str(path))
    return str(path)
