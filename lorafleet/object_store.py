"""S3 and S3-compatible object stores (`s3://bucket/prefix`): the one client, the errors users see, and the
conditional writes the registry commits with.

Credentials and endpoint come from the usual AWS settings: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
(/ AWS_SESSION_TOKEN), AWS_PROFILE, AWS_ENDPOINT_URL (MinIO, Ceph, a local emulator), AWS_REGION or
AWS_DEFAULT_REGION. Ray Train's checkpoints go through pyarrow, which reads the same variables.

Object stores have no rename: a multi-object change is committed by writing its last object conditionally
(`If-None-Match: *` creates only if absent, `If-Match: <etag>` replaces only what was read).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lorafleet.errors import LorafleetError

SCHEME = "s3://"
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
ATTEMPTS = 3
DEFAULT_REGION = "us-east-1"
MAX_READ_BYTES = 16 << 20  # objects read whole into memory (records, aliases, policies)


class StorageError(LorafleetError):
    """Object storage cannot be used as asked (unreachable, refused, missing bucket)."""

    exit_code = 1


class PreconditionFailed(StorageError):
    """A conditional write lost: the object exists (If-None-Match) or changed since it was read (If-Match)."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str  # no leading or trailing '/'

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        if not uri.startswith(SCHEME):
            raise StorageError(f"{uri} is not an s3:// URI")
        bucket, _, key = uri.removeprefix(SCHEME).partition("/")
        if not bucket:
            raise StorageError(f"{uri} names no bucket (s3://BUCKET/prefix)")
        parts = [part for part in key.split("/") if part]
        if any(part in (".", "..") for part in parts):
            raise StorageError(f"{uri}: '.' and '..' are not allowed in an object key")
        return cls(bucket, "/".join(parts))

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}".rstrip("/")

    def child(self, *parts: str) -> S3Location:
        return S3Location(self.bucket, "/".join(p.strip("/") for p in (self.key, *parts) if p.strip("/")))


def is_s3_uri(uri: str) -> bool:
    return str(uri).startswith(SCHEME)


@lru_cache(maxsize=1)
def client():
    """One boto3 S3 client per process: short connect timeout, few retries (a dead endpoint fails fast)."""
    import boto3
    from botocore.config import Config

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"max_attempts": ATTEMPTS, "mode": "standard"},
    )
    return boto3.session.Session().client("s3", region_name=region, config=config)


def explain(error: Exception, uri: str, doing: str) -> StorageError:
    """The one line a user sees for a failed object-store call: what, where, and what to check."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    if isinstance(error, NoCredentialsError):
        return StorageError(f"{uri}: no credentials to {doing} (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE)")
    unreachable = type(error).__name__ in ("ConnectTimeoutError", "ConnectionClosedError")
    if isinstance(error, EndpointConnectionError) or unreachable:
        return StorageError(f"{uri}: cannot reach the object store at {endpoint} to {doing}")
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
            return PreconditionFailed(f"{uri}: changed by someone else meanwhile ({doing})")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return StorageError(f"{uri}: the credentials were refused ({code}) when trying to {doing}")
        if code == "NoSuchBucket":
            return StorageError(f"{uri}: the bucket does not exist at {endpoint}")
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
            return StorageError(f"{uri}: access denied to {doing} (the credentials lack that permission)")
        return StorageError(f"{uri}: {doing} failed: {code or status}: {error}")
    return StorageError(f"{uri}: {doing} failed: {error}")


def call(uri: str, doing: str, function, /, **kwargs):
    """`client().<function>(**kwargs)` with its failure explained."""
    try:
        return getattr(client(), function)(**kwargs)
    except LorafleetError:
        raise
    except Exception as exc:
        if is_store_error(exc):
            raise explain(exc, uri, doing) from None
        raise


def is_store_error(error: Exception) -> bool:
    """An error of the store or the way to it (explained to the user); anything else is a bug, traceback kept."""
    return type(error).__module__.startswith(("botocore", "boto3", "urllib3"))


def check_writable(uri: str) -> None:
    """Before any work: the endpoint answers, the credentials are accepted, the bucket exists and takes writes
    (a probe object under the prefix, written and removed)."""
    location = S3Location.parse(uri)
    # A listing, not HeadBucket: its error body names the cause (a refused key, a missing bucket, a denial).
    call(uri, f"list the bucket {location.bucket}", "list_objects_v2", Bucket=location.bucket, Prefix=location.key,
         MaxKeys=1)  # fmt: skip
    probe = location.child(f".lorafleet-write-probe-{uuid.uuid4().hex}")
    call(uri, "write to it", "put_object", Bucket=probe.bucket, Key=probe.key, Body=b"")
    call(uri, "delete from it", "delete_object", Bucket=probe.bucket, Key=probe.key)


@dataclass(frozen=True)
class StoredObject:
    key: str  # relative to the listed prefix
    size: int
    etag: str


class ObjectFolder:
    """The objects under one prefix, addressed by names relative to it."""

    def __init__(self, location: S3Location):
        self.location = location

    @property
    def uri(self) -> str:
        return self.location.uri

    def _key(self, name: str) -> str:
        return self.location.child(name).key

    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        base = self.location.key + "/" if self.location.key else ""
        pages = client().get_paginator("list_objects_v2").paginate(Bucket=self.location.bucket, Prefix=base + prefix)
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    if item["Key"].endswith("/"):
                        continue  # a folder marker (pyarrow writes them), not an object of the folder
                    yield StoredObject(item["Key"][len(base) :], int(item["Size"]), item["ETag"])
        except Exception as exc:
            if is_store_error(exc):
                raise explain(exc, self.uri, "list it") from None
            raise

    def read(self, name: str) -> tuple[bytes, str] | None:
        """(content, etag) of a small object (a record, aliases, a policy: ≤ 16 MiB, read whole), or None when there
        is no such object."""
        from botocore.exceptions import ClientError

        try:
            answer = client().get_object(Bucket=self.location.bucket, Key=self._key(name))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise explain(exc, f"{self.uri}/{name}", "read it") from None
        except Exception as exc:
            raise explain(exc, f"{self.uri}/{name}", "read it") from None
        if int(answer.get("ContentLength", 0)) > MAX_READ_BYTES:
            answer["Body"].close()
            raise StorageError(f"{self.uri}/{name}: larger than {MAX_READ_BYTES >> 20} MiB, not a file lorafleet wrote")
        return answer["Body"].read(), answer["ETag"]

    def write(self, name: str, data: bytes, *, if_absent: bool = False, if_etag: str | None = None) -> str:
        """Write one object (one PUT: readers see all of it or none); the new etag. Conditional writes raise
        PreconditionFailed when they lose."""
        conditions = {"IfNoneMatch": "*"} if if_absent else ({"IfMatch": if_etag} if if_etag else {})
        answer = call(
            f"{self.uri}/{name}", "write it", "put_object",
            Bucket=self.location.bucket, Key=self._key(name), Body=data, **conditions,
        )  # fmt: skip
        return answer["ETag"]

    def upload(self, name: str, path: Path) -> None:
        with open(path, "rb") as handle:
            call(f"{self.uri}/{name}", "upload it", "upload_fileobj", Fileobj=handle, Bucket=self.location.bucket,
                 Key=self._key(name))  # fmt: skip

    def download_into(self, name: str, folder: Path) -> None:
        """Download object `name` to `folder/name`; a name that would land outside `folder` is not fetched."""
        path = folder / name
        if path.resolve().is_relative_to(folder.resolve()):
            self.download(name, path)

    def download(self, name: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            call(f"{self.uri}/{name}", "download it", "download_fileobj", Bucket=self.location.bucket,
                 Key=self._key(name), Fileobj=handle)  # fmt: skip

    def delete(self, name: str) -> None:
        call(f"{self.uri}/{name}", "delete it", "delete_object", Bucket=self.location.bucket, Key=self._key(name))
