"""Session-wide fixtures: one local Ray cluster for the whole test session, the environment of
the S3 endpoint that tests/test_object_storage.py starts, GPU skipping."""

from __future__ import annotations

import socket

import pytest
import torch


@pytest.fixture(scope="session")
def s3_env():
    """Point every S3 client of the session (s3fs, botocore) at http://127.0.0.1:PORT with dummy
    credentials, and yield PORT, a free port for tests/test_object_storage.py's endpoint. Set
    before Ray starts (`ray_cluster` depends on it): Ray's worker processes get the environment
    the cluster started with, not later changes. No test can reach a real cloud account."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        mp.setenv("AWS_ACCESS_KEY_ID", "test-access-key")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-key-never-printed")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
        yield port


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3_env):
    """A local Ray cluster (2 CPUs, no dashboard, temp files under the test's tmp path), started
    once per session (after `s3_env`, which its workers inherit); `extract` reuses it. Yields its
    address for subprocesses to join."""
    import ray

    temp_dir = tmp_path_factory.mktemp("ray")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(temp_dir), log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
