"""A local S3-compatible server for the tests: moto's standalone server (`moto_server`), an emulator of the S3 API
(and of IAM's access checks), not AWS. It speaks the same HTTP protocol boto3 and pyarrow use against AWS.

It starts open, gets two users (a writer with every S3 right, a reader that can only read) and a bucket, then
turns on request authentication: from then on a wrong key or a missing permission is refused as AWS would.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    writer: tuple[str, str]
    reader: tuple[str, str]
    process: subprocess.Popen

    def env(self, keys: tuple[str, str] | None = None, *, endpoint: str | None = None) -> dict[str, str]:
        """The AWS variables a lorafleet command needs (the writer's keys unless told otherwise)."""
        access, secret = keys or self.writer
        return {
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_ACCESS_KEY_ID": access,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self, keys: tuple[str, str] | None = None):
        import boto3

        access, secret = keys or self.writer
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=access,
                            aws_secret_access_key=secret, region_name=REGION)  # fmt: skip

    def keys_under(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_s3_server(log_dir: Path, bucket: str = "lorafleet-test") -> S3Server:
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = Path(sys.executable).parent / "moto_server"
    log = open(log_dir / "moto.log", "w")  # noqa: SIM115 - the server's whole life
    process = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "inf"})  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{endpoint}/moto-api/", timeout=1)
            break
        except httpx.HTTPError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start: {(log_dir / 'moto.log').read_text()[-2000:]}") from None
            time.sleep(0.2)
    setup = {"endpoint_url": endpoint, "region_name": REGION, "aws_access_key_id": "setup",
             "aws_secret_access_key": "setup"}  # fmt: skip
    iam = boto3.client("iam", **setup)

    def user(name: str, actions: list[str]) -> tuple[str, str]:
        iam.create_user(UserName=name)
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
        iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    writer = user("writer", ["s3:*"])
    reader = user("reader", ["s3:Get*", "s3:List*", "s3:HeadBucket"])
    boto3.client("s3", **setup).create_bucket(Bucket=bucket)
    httpx.post(f"{endpoint}/moto-api/reset-auth", content=b"0").raise_for_status()  # authenticate from now on
    return S3Server(endpoint, bucket, writer, reader, process)
