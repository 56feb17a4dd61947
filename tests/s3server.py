"""An S3-compatible server for the tests: moto's standalone server (`moto_server`, from PyPI: the `test` extra),
which speaks the S3 wire protocol, on a free loopback port. There is no real S3 here; the tests drive it with
the real boto3 client, as the server does. (moto does not enforce a presigned URL's expiry time.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from ports import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "k5serve-test", "AWS_SECRET_ACCESS_KEY": "k5serve-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    """`url`: the endpoint (for --s3-endpoint); `client()`: a boto3 client on it; `bucket(name)` creates one."""

    def __init__(self) -> None:
        exe = Path(sys.executable).with_name("moto_server")
        if not exe.exists():
            found = shutil.which("moto_server")
            if found is None:
                raise RuntimeError("moto_server is not installed (pip install 'moto[server]')")
            exe = Path(found)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = Path(tempfile.mkdtemp(prefix="k5serve-s3-"))
        self._log = open(self.root / "moto.log", "w")
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)], cwd=self.root,
                                     stdout=self._log, stderr=subprocess.STDOUT, env=dict(os.environ, **CREDENTIALS))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited: {(self.root / 'moto.log').read_text()}")
            try:
                httpx.get(self.url, timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.close()
        raise RuntimeError("moto_server did not start in 60 s")

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        listing = self.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for item in listing.get("Contents", []))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()
        shutil.rmtree(self.root, ignore_errors=True)
