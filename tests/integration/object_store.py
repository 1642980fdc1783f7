"""A real S3-compatible server for the tests: moto's standalone server on 127.0.0.1, reached
only through the standard AWS environment, as a user's MinIO or AWS would be."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
REGION = "us-east-1"
SET_UP_ACTIONS = 3  # create_user, put_user_policy, create_access_key: then moto checks every call
S3_ONLY = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Until something accepts connections on 127.0.0.1:port (or the process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing answered on 127.0.0.1:{port} within {timeout:g} s")


def stop_group(
    process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S, first: int = signal.SIGTERM
) -> None:
    """Signal the process group started for `process` (SIGTERM), SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, first)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout)


@contextmanager
def moto_server(log: Path) -> Iterator[dict[str, str]]:
    """Run `moto_server` on a free port with authentication on (so wrong credentials are
    refused, as by a real store); yields the AWS environment of an IAM user allowed s3:*."""
    port = free_port()
    command = [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p"]
    env = os.environ | {"INITIAL_NO_AUTH_ACTION_COUNT": str(SET_UP_ACTIONS)}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*command, str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        wait_for_port(port, START_TIMEOUT_S, process)
        endpoint = f"http://127.0.0.1:{port}"
        yield {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": REGION, **_user(endpoint)}
    finally:
        stop_group(process)


def _user(endpoint: str) -> dict[str, str]:
    """An IAM user with an s3:* policy and its access key (the server's set-up actions)."""
    import boto3

    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="set-up",
        aws_secret_access_key="set-up",
    )
    iam.create_user(UserName="moco")
    iam.put_user_policy(UserName="moco", PolicyName="s3", PolicyDocument=S3_ONLY)
    key = iam.create_access_key(UserName="moco")["AccessKey"]
    return {
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
    }


def make_bucket(name: str) -> str:
    """Create a bucket through boto3 (standard environment); returns `s3://name`."""
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"
