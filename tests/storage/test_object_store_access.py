"""Access denied on read and on write: one line, exit status 2, before any work, nothing published.

The S3 server (moto on loopback) authenticates and authorises requests here:
moto evaluates IAM user policies (it does not evaluate bucket policies), so
each case runs as an IAM user whose policy allows everything but one
action on one prefix, with that user's own keys. The server refuses the
request (403); nothing of ours is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.data import write_input
from tests.support.object_store import FAKE_CREDENTIALS, moto_server
from tests.support.paths import REPO

pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "access-bucket"
RUN = [sys.executable, "-m", "mf_dist.cli", "run", "--epochs", "2"]


@pytest.fixture(scope="module")
def server(tiny_ratings, tmp_path_factory) -> Iterator[str]:
    """A moto server with the input under ratings/; yields its endpoint (authorisation off until a case)."""
    import boto3

    with moto_server() as endpoint:
        session = boto3.session.Session(
            aws_access_key_id="setup", aws_secret_access_key="setup", region_name="us-east-1"
        )
        s3 = session.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket=BUCKET)
        source = write_input(tiny_ratings, tmp_path_factory.mktemp("access") / "input")
        for file in sorted(source.iterdir()):
            s3.upload_file(str(file), BUCKET, f"ratings/{file.name}")
        yield endpoint


def user_with_one_denial(endpoint: str, name: str, action: str, prefix: str) -> dict[str, str]:
    """An IAM user allowed everything except ``action`` on ``prefix``; returns its environment (keys)."""
    import boto3

    iam = boto3.session.Session(
        aws_access_key_id="setup", aws_secret_access_key="setup", region_name="us-east-1"
    ).client("iam", endpoint_url=endpoint)
    iam.create_user(UserName=name)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "*", "Resource": "*"},
            {"Effect": "Deny", "Action": action, "Resource": f"arn:aws:s3:::{BUCKET}/{prefix}*"},
        ],
    }
    iam.put_user_policy(UserName=name, PolicyName="one-denial", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


@pytest.mark.parametrize(
    ("case", "action", "denied", "output", "failing"),
    [
        # The input's footers are read before anything else.
        ("read-input", "s3:GetObject", "ratings/", "out-r", "ratings"),
        # Taking the output's lock is a write under the output.
        ("write-output", "s3:PutObject", "out-o/", "out-o", "out-o"),
        # The work directory (<output>/_work) gets a write probe of its own.
        ("write-work", "s3:PutObject", "out-w/_work", "out-w", "out-w/_work"),
    ],
)
def test_denied_access_is_one_line_before_any_work_and_nothing_is_published(
    server, tmp_path, case, action, denied, output, failing
):
    output, failing = f"s3://{BUCKET}/{output}", f"s3://{BUCKET}/{failing}"
    keys = user_with_one_denial(server, f"user-{case}", action, denied)
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in FAKE_CREDENTIALS or key == "AWS_DEFAULT_REGION"
    }
    environment |= {
        **keys,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": server,
        "PYTHONPATH": str(REPO),
        "COLUMNS": "400",
    }
    import moto.settings

    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    try:
        result = subprocess.run(
            [*RUN, "--input", f"s3://{BUCKET}/ratings/", "--output", output, "--workers", "1"],
            capture_output=True,
            text=True,
            env=environment,
            cwd=tmp_path,
            timeout=180,
        )
    finally:
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {failing}") and "access denied" in lines[0], lines[0]
    # Nothing was published, nothing was trained.
    import fsspec

    filesystem = fsspec.filesystem(
        "s3",
        key="setup",
        secret="setup",
        token=None,
        client_kwargs={"endpoint_url": server},
        skip_instance_cache=True,
    )
    written = filesystem.find(f"{BUCKET}/{output.split('/', 3)[3]}")
    assert not [name for name in written if name.endswith(("LATEST", ".parquet", ".npy"))], written
    assert not list(Path(tmp_path).rglob("*.parquet"))
