"""Where archive objects go: an S3-API bucket or a local directory, through ``pyarrow.fs``.

Both are whole-object writes: an S3 PUT is atomic, and a local file is written beside its final
name and renamed, so a reader never sees half a file and a rewrite of the same name with the
same bytes (a replay) is harmless. Calls block; the service runs them in a thread.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs
from pydantic import SecretStr


@dataclass(frozen=True)
class S3Options:
    endpoint: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None

    def __repr__(self) -> str:  # never show the credentials
        return f"S3Options(endpoint={self.endpoint!r}, region={self.region!r})"


class ArchiveStore:
    """Put and get whole objects under a root (``bucket/prefix`` or a directory)."""

    def __init__(self, fs: pafs.FileSystem, root: str, local: bool, description: str,
                 s3_options: S3Options | None = None) -> None:
        self.fs = fs
        self.s3_options = s3_options
        self._s3_client: Any = None
        self.root = root.rstrip("/")
        self.local = local
        self.description = description
        self._dirs: set[str] = set()

    def __repr__(self) -> str:
        return f"ArchiveStore({self.description})"

    def __getstate__(self) -> dict[str, Any]:
        """For another process (a training set's shares): the filesystem and options travel,
        the S3 client made for conditional puts does not (the receiver makes its own)."""
        return {**self.__dict__, "_s3_client": None, "_dirs": set()}

    @classmethod
    def open(cls, url: str, s3: S3Options | None = None) -> ArchiveStore:
        parts = urlsplit(url)
        if parts.scheme == "s3":
            return cls(make_s3(s3 or S3Options()), f"{parts.netloc}{parts.path}", False,
                       f"s3://{parts.netloc}{parts.path}", s3)
        path = parts.path if parts.scheme == "file" else url
        root = os.path.abspath(path)
        return cls(pafs.LocalFileSystem(), root, True, root)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def put(self, name: str, data: bytes) -> None:
        target = self.path(name)
        if not self.local:
            with self.fs.open_output_stream(target) as out:
                out.write(data)
            return
        parent = target.rpartition("/")[0]
        if parent not in self._dirs:
            self.fs.create_dir(parent, recursive=True)
            self._dirs.add(parent)
        temporary = f"{parent}/.{uuid.uuid4().hex}.tmp"
        try:
            with self.fs.open_output_stream(temporary) as out:
                out.write(data)
            self.fs.move(temporary, target)
        except OSError:
            self._dirs.discard(parent)
            raise

    def claim(self, name: str, data: bytes) -> bytes | None:
        """Write only if nothing is there yet (an S3 conditional put, ``If-None-Match: *``; a
        hard link locally). None: written; else the bytes already there. This is what makes a
        cut marker a claim that two writers cannot both win."""
        target = self.path(name)
        if not self.local:
            return self._s3_claim(target, data)
        parent = target.rpartition("/")[0]
        os.makedirs(parent, exist_ok=True)
        temporary = f"{parent}/.{uuid.uuid4().hex}.tmp"
        with open(temporary, "wb") as out:
            out.write(data)
        try:
            os.link(temporary, target)
            return None
        except FileExistsError:
            with open(target, "rb") as existing:
                return existing.read()
        finally:
            os.unlink(temporary)

    def _s3_claim(self, target: str, data: bytes) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, _, key = target.partition("/")
        try:
            self.s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return None
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412"):
                raise OSError(f"conditional put of {key} failed: {exc}") from None
        except BotoCoreError as exc:  # connection refused, timeouts: the store is down
            raise OSError(f"conditional put of {key} failed: {exc}") from None
        existing = self.get(target[len(self.root) + 1:])
        if existing is None:  # deleted in between: try again later
            raise OSError(f"{key} refused the conditional put but is not there")
        return existing

    def s3_client(self) -> Any:
        if self._s3_client is None:
            import boto3
            from botocore.config import Config

            options = self.s3_options or S3Options()
            kwargs: dict[str, Any] = {"config": Config(
                connect_timeout=2, read_timeout=10, retries={"max_attempts": 2})}
            if options.endpoint:
                kwargs["endpoint_url"] = options.endpoint
            if options.region:
                kwargs["region_name"] = options.region
            if options.access_key_id is not None and options.secret_access_key is not None:
                kwargs["aws_access_key_id"] = options.access_key_id.get_secret_value()
                kwargs["aws_secret_access_key"] = options.secret_access_key.get_secret_value()
            self._s3_client = boto3.client("s3", **kwargs)
        return self._s3_client

    def get(self, name: str) -> bytes | None:
        """The object's bytes, None if it does not exist; OSError if the store cannot tell."""
        target = self.path(name)
        if self.fs.get_file_info(target).type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(target) as source:
            return bytes(source.read())

    def check(self) -> None:
        """Reach the root (the bucket, the directory): OSError while the store is down."""
        if self.local:
            self.fs.create_dir(self.root, recursive=True)
            return
        info = self.fs.get_file_info(self.root.split("/", 1)[0])
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"bucket of {self.description} does not exist")


def make_s3(options: S3Options) -> pafs.S3FileSystem:
    """A pyarrow S3 client that fails fast (the service does the waiting and retrying)."""
    kwargs: dict[str, object] = {
        "connect_timeout": 2.0, "request_timeout": 10.0,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=2),
    }
    if options.endpoint:
        endpoint = urlsplit(options.endpoint)
        kwargs["endpoint_override"] = endpoint.netloc or endpoint.path
        kwargs["scheme"] = endpoint.scheme or "https"
    if options.region:
        kwargs["region"] = options.region
    if options.access_key_id is not None and options.secret_access_key is not None:
        kwargs["access_key"] = options.access_key_id.get_secret_value()
        kwargs["secret_key"] = options.secret_access_key.get_secret_value()
    return pafs.S3FileSystem(**kwargs)
