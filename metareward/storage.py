"""Artifact storage: a local folder or an S3 bucket, atomic writes, sharded artifacts with manifests.

Supported roots (`StorageConfig.root`): a local folder (a plain path such as `./runs`, or a
`file://` URL) and S3 or any S3-compatible server (`s3://bucket/prefix`, through s3fs). The bucket
must exist; the store never creates buckets.

Layout (documented in `docs/artifacts.md`, "Storage layout"):

    {root}/{run}/iter-{i}/{stage}/data.parquet     the artifact's table (every row exactly once)
    {root}/{run}/iter-{i}/{stage}/manifest.json    written last: the artifact is complete once it exists
    {root}/{run}/iter-{i}/{stage}/shards/          shard files and plan.json while a sharded stage runs
    {root}/{run}/iter-{i}/model/                   the checkpoint M_i of iteration i

Atomicity: no reader ever sees half a file. On a local folder a file is written under a temporary
name beside the target (`.{name}.tmp-{uuid}`) and renamed over it (`os.replace`, atomic on POSIX).
On S3 an object is sent in one request (a single PUT, or a multipart upload that only appears
when it completes), so the object under the final name is always whole.

Credentials never appear in the config, in `repr(store)` or in this module's logs: the config only
names the environment variables that hold them.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator, Literal, Sequence

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, Field, field_validator

logger = logging.getLogger(__name__)

ChecksumMode = Literal["auto", "when_supported", "when_required"]


class StorageConfig(BaseModel):
    """Where a run's artifacts and checkpoints are stored.

    Parameters:
        > Location

        root (`str`, *optional*, defaults to `"./runs"`):
            fsspec URL of the storage root: a local folder (`./runs`, `/data/runs`, `file:///data/runs`)
            or `s3://bucket/prefix` (S3 or an S3-compatible server; the bucket must exist).
        endpoint_url (`str` or `None`, *optional*, defaults to `None`):
            S3 endpoint of a non-AWS server, e.g. `http://127.0.0.1:9000`. `None` takes it from the
            environment (`AWS_ENDPOINT_URL_S3`, then `AWS_ENDPOINT_URL`); when neither is set, AWS.
        region (`str` or `None`, *optional*, defaults to `None`):
            S3 region. `None` lets botocore decide (`AWS_DEFAULT_REGION`, profile). The store never
            creates buckets, so the us-east-1 location-constraint pitfall of bucket creation does not apply.

        > Credentials (names of environment variables, never the secrets)

        access_key_id_env (`str` or `None`, *optional*, defaults to `None`):
            Name of the environment variable holding the access key id. `None` uses botocore's
            standard chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, profiles, instance roles).
            When set, `secret_access_key_env` must be set too and both variables must exist.
        secret_access_key_env (`str` or `None`, *optional*, defaults to `None`):
            Name of the environment variable holding the secret access key.
        session_token_env (`str` or `None`, *optional*, defaults to `None`):
            Name of the environment variable holding a session token (temporary credentials).

        > Request behaviour

        response_checksum_validation (`"auto"`, `"when_supported"` or `"when_required"`, *optional*, defaults to `"auto"`):
            botocore's response checksum validation. `"auto"` means `"when_required"` whenever an
            endpoint URL is in effect (non-AWS servers such as `rclone serve s3` return whole-object
            checksums on ranged reads, which fail botocore's default validation) and botocore's
            default on AWS.
        request_checksum_calculation (`"auto"`, `"when_supported"` or `"when_required"`, *optional*, defaults to `"auto"`):
            botocore's request checksum calculation, same `"auto"` rule.
        max_attempts (`int`, *optional*, defaults to `3`):
            Attempts per S3 request inside botocore (standard retry mode), first one included. Longer
            outages surface as transient errors (`is_transient_storage_error`) for the task's own retries.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: str = "./runs"
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id_env: str | None = None
    secret_access_key_env: str | None = None
    session_token_env: str | None = None
    response_checksum_validation: ChecksumMode = "auto"
    request_checksum_calculation: ChecksumMode = "auto"
    max_attempts: int = Field(default=3, ge=1, le=20)

    @field_validator("root")
    @classmethod
    def _root_not_empty(cls, root: str) -> str:
        if not root.strip():
            raise ValueError("StorageConfig.root must not be empty (use a folder such as ./runs or s3://bucket/prefix)")
        return root

    def resolved_endpoint_url(self) -> str | None:
        """The endpoint in effect: the config's, else `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`, else None (AWS)."""
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


class StorageError(OSError):
    """A storage operation failed; the message names the URI. Retrying will not help unless the
    error is a `TransientStorageError`."""


class TransientStorageError(StorageError):
    """A storage operation failed for a reason that may pass (connection refused or reset, timeout,
    throttling, a 5xx from the server); retrying with backoff is the right response."""


# ----------------------------------------------------------------------------------------------
# names and URIs

MANIFEST_FILE = "manifest.json"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TEMP_MARK = ".tmp-"


def validate_run_name(name: str) -> str:
    """Return `name` if it is a safe run name, else raise ValueError saying what is wrong.

    A run name becomes one path segment under the storage root, so anything that could leave the
    root or hide a file is refused: empty names, `..`, `/` and `\\`, absolute paths, control
    characters and leading dots. Allowed: letters, digits, `.`, `_`, `-`, starting with a letter or
    digit, at most 128 characters.
    """
    return _validate_segment(name, "run name")


def _validate_segment(name: str, what: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a string, got {type(name).__name__}: {name!r}")
    if name == "":
        raise ValueError(f"{what} must not be empty")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise ValueError(f"{what} {name!r} contains control characters")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise ValueError(f"{what} {name!r} is an absolute path; give a plain name such as 'demo'")
    if "/" in name or "\\" in name:
        raise ValueError(f"{what} {name!r} contains a path separator ('/' or '\\'); give a plain name such as 'demo'")
    if ".." in name:
        raise ValueError(f"{what} {name!r} contains '..'")
    if name.startswith("."):
        raise ValueError(f"{what} {name!r} starts with a dot")
    if not _SAFE_NAME.match(name):
        raise ValueError(
            f"{what} {name!r} has characters outside letters, digits, '.', '_' and '-' (or is longer than 128)"
        )
    return name


def _is_temp_name(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name


def _temp_name(name: str) -> str:
    return f".{name}{TEMP_MARK}{uuid.uuid4().hex}"


# ----------------------------------------------------------------------------------------------
# error classification

# errno values that mean "the network or the server had a moment": EBUSY and EREMOTEIO are what
# s3fs turns SlowDown/503 and InternalError/500 into.
_TRANSIENT_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.EAGAIN,
    errno.EBUSY,
    getattr(errno, "EREMOTEIO", errno.EIO + 1000),
}
_TRANSIENT_S3_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "BandwidthLimitExceeded",
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
}
_PERMANENT_TYPES = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)


def is_transient_storage_error(exc: BaseException) -> bool:
    """True when retrying the storage call may succeed.

    Transient: connection refused/reset/aborted, timeouts, the server closing the connection,
    throttling (`SlowDown`, `Throttling`, HTTP 429) and server errors (HTTP 5xx, `InternalError`,
    `ServiceUnavailable`), from botocore, aiobotocore/aiohttp, fsspec or plain `OSError`s.
    Not transient: missing files or buckets, permission and bad-credential errors, bad requests,
    anything else. The exception's cause chain is followed, since s3fs wraps botocore errors.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        verdict = _classify(current)
        if verdict is not None:
            return verdict
        current = current.__cause__ or current.__context__
    return False


def _classify(exc: BaseException) -> bool | None:
    """True/False when this exception alone decides, None to look at its cause."""
    if isinstance(exc, TransientStorageError):
        return True
    if isinstance(exc, StorageError):  # classified when it was raised
        return False
    if isinstance(exc, _PERMANENT_TYPES):
        return False
    try:
        import botocore.exceptions as bexc
    except ImportError:  # only the local backend is installed
        bexc = None
    if bexc is not None:
        if isinstance(exc, (bexc.NoCredentialsError, bexc.PartialCredentialsError, bexc.ParamValidationError)):
            return False
        if isinstance(exc, (bexc.ConnectionError, bexc.HTTPClientError)):
            return True
        if isinstance(exc, bexc.ClientError):
            error = exc.response.get("Error", {}) if isinstance(exc.response, dict) else {}
            status = (exc.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode") if isinstance(exc.response, dict) else None
            code = str(error.get("Code", ""))
            if code in _TRANSIENT_S3_CODES or code in {"429", "500", "502", "503", "504"}:
                return True
            return bool(status is not None and (status == 429 or status >= 500))
    try:
        import aiohttp
    except ImportError:
        aiohttp = None
    if aiohttp is not None and isinstance(
        exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ServerTimeoutError)
    ):
        return True
    from fsspec.exceptions import FSTimeoutError

    if isinstance(exc, (FSTimeoutError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    return None


@contextmanager
def _storage_errors(action: str, uri: str) -> Iterator[None]:
    """Re-raise storage failures with the action and URI in the message, keeping the cause."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise FileNotFoundError(errno.ENOENT, f"cannot {action} {uri}: not found ({exc})", uri) from exc
    except PermissionError as exc:
        raise PermissionError(
            errno.EACCES,
            f"cannot {action} {uri}: permission denied ({exc}); check the credentials and the bucket policy",
            uri,
        ) from exc
    except Exception as exc:
        if is_transient_storage_error(exc):
            raise TransientStorageError(f"cannot {action} {uri}: transient storage error, retrying may help ({exc})") from exc
        if isinstance(exc, OSError) or _is_botocore_error(exc):
            raise StorageError(f"cannot {action} {uri}: {exc}") from exc
        raise


def _is_botocore_error(exc: BaseException) -> bool:
    try:
        import botocore.exceptions as bexc
    except ImportError:
        return False
    return isinstance(exc, (bexc.BotoCoreError, bexc.ClientError))


# ----------------------------------------------------------------------------------------------
# the store


class Store:
    """A storage root with one reused fsspec filesystem and atomic writes.

    URIs handed out and accepted are absolute local paths (for a local root) or `s3://bucket/key`
    strings (for an S3 root). The S3 filesystem has its listings cache off, so every write of this
    process is visible to the next `exists`/`ls`. Pickling a Store sends only its config; the
    credentials are read from the environment again on the other side.
    """

    def __init__(self, config: StorageConfig | None = None):
        self.config = config if config is not None else StorageConfig()
        protocol = fsspec.utils.get_protocol(self.config.root)
        if protocol in ("file", "local"):
            self.protocol = "file"
            path = self.config.root
            for prefix in ("file://", "local://"):
                if path.startswith(prefix):
                    path = path[len(prefix):]
            self.root = os.path.abspath(os.path.expanduser(path))
            self.fs = LocalFileSystem()
        elif protocol in ("s3", "s3a"):
            self.protocol = "s3"
            bucket_and_prefix = self.config.root.split("://", 1)[1].strip("/")
            if not bucket_and_prefix:
                raise ValueError(f"StorageConfig.root {self.config.root!r} names no bucket; use s3://bucket or s3://bucket/prefix")
            self.root = f"s3://{bucket_and_prefix}"
            import s3fs

            self.fs = s3fs.S3FileSystem(**self._s3_options())
        else:
            raise ValueError(
                f"StorageConfig.root {self.config.root!r}: protocol {protocol!r} is not supported; "
                "use a local folder (./runs, file:///path) or s3://bucket/prefix"
            )

    def _s3_options(self) -> dict[str, Any]:
        cfg = self.config
        options: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True}
        if (cfg.access_key_id_env is None) != (cfg.secret_access_key_env is None):
            raise ValueError(
                "StorageConfig: set both access_key_id_env and secret_access_key_env, or neither "
                "(neither = botocore's standard credential chain)"
            )
        for field_name, option in (
            ("access_key_id_env", "key"),
            ("secret_access_key_env", "secret"),
            ("session_token_env", "token"),
        ):
            variable = getattr(cfg, field_name)
            if variable is None:
                continue
            value = os.environ.get(variable)
            if not value:
                raise ValueError(f"StorageConfig.{field_name} names the environment variable {variable!r}, which is not set")
            options[option] = value
        endpoint = cfg.resolved_endpoint_url()
        if endpoint:
            options["endpoint_url"] = endpoint
        if cfg.region:
            options["client_kwargs"] = {"region_name": cfg.region}
        config_kwargs: dict[str, Any] = {"retries": {"max_attempts": cfg.max_attempts, "mode": "standard"}}
        for name in ("response_checksum_validation", "request_checksum_calculation"):
            mode = getattr(cfg, name)
            if mode == "auto":
                mode = "when_required" if endpoint else None
            if mode is not None:
                config_kwargs[name] = mode
        options["config_kwargs"] = config_kwargs
        return options

    def __repr__(self) -> str:
        endpoint = self.config.resolved_endpoint_url() if self.protocol == "s3" else None
        return f"Store(root={self.root!r}" + (f", endpoint_url={endpoint!r}" if endpoint else "") + ")"

    __str__ = __repr__

    def __reduce__(self):
        return (Store, (self.config,))

    # ---- layout -----------------------------------------------------------------------------

    def run_uri(self, run: str) -> str:
        """`{root}/{run}`; the run name is checked with `validate_run_name`."""
        return f"{self.root}/{validate_run_name(run)}"

    def iteration_uri(self, run: str, iteration: int) -> str:
        """`{root}/{run}/iter-{iteration}`."""
        if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
            raise ValueError(f"iteration must be an integer >= 0, got {iteration!r}")
        return f"{self.run_uri(run)}/iter-{iteration}"

    def stage_uri(self, run: str, iteration: int, stage: str) -> str:
        """`{root}/{run}/iter-{iteration}/{stage}`: the folder of one stage's artifact."""
        return f"{self.iteration_uri(run, iteration)}/{_validate_segment(stage, 'stage name')}"

    def checkpoint_uri(self, run: str, iteration: int) -> str:
        """`{root}/{run}/iter-{iteration}/model`: where iteration i's checkpoint M_i lives."""
        return self.stage_uri(run, iteration, "model")

    def list_iterations(self, run: str) -> list[int]:
        """The iteration numbers that have a folder under the run (complete or not), ascending."""
        run_uri = self.run_uri(run)
        if not self.exists(run_uri):
            return []
        found = []
        for child in self.ls(run_uri):
            match = re.fullmatch(r"iter-(\d+)", child.rstrip("/").rsplit("/", 1)[-1])
            if match:
                found.append(int(match.group(1)))
        return sorted(found)

    def join(self, uri: str, *parts: str) -> str:
        """`uri/part1/part2`; each part may contain '/' but no '..' or empty segment."""
        for part in parts:
            for segment in part.split("/"):
                if segment in ("", ".", ".."):
                    raise ValueError(f"bad path part {part!r} to join under {uri}")
        return "/".join([uri.rstrip("/"), *parts])

    def _path(self, uri: str) -> str:
        """The filesystem path of a URI, refusing URIs of another protocol."""
        protocol = fsspec.utils.get_protocol(uri)
        if self.protocol == "file":
            if protocol not in ("file", "local"):
                raise ValueError(f"{uri} is not a local path, but this store's root is the local folder {self.root}")
            for prefix in ("file://", "local://"):
                if uri.startswith(prefix):
                    uri = uri[len(prefix):]
            return os.path.abspath(uri)
        if protocol not in ("s3", "s3a"):
            raise ValueError(f"{uri} is not an s3:// URI, but this store's root is {self.root}")
        return uri.split("://", 1)[1].rstrip("/")

    def _uri(self, path: str) -> str:
        return path if self.protocol == "file" else f"s3://{path}"

    # ---- reads and writes -------------------------------------------------------------------

    def write_bytes(self, data: bytes, uri: str) -> str:
        """Write `data` to `uri` atomically (see the module docstring) and return the URI."""
        path = self._path(uri)
        with _storage_errors("write", uri):
            if self.protocol == "file":
                directory, name = os.path.split(path)
                os.makedirs(directory, exist_ok=True)
                temp = os.path.join(directory, _temp_name(name))
                try:
                    with open(temp, "wb") as handle:
                        handle.write(data)
                        handle.flush()
                        os.fsync(handle.fileno())
                    os.replace(temp, path)
                except BaseException:
                    _remove_quietly(temp)
                    raise
            else:
                # One request: s3fs sends one PUT (or one multipart upload above 100 MB); S3
                # shows the object only once the request completes.
                self.fs.pipe_file(path, data)
        return uri

    def read_bytes(self, uri: str) -> bytes:
        with _storage_errors("read", uri):
            return self.fs.cat_file(self._path(uri))

    def write_parquet(self, df: pd.DataFrame, uri: str, metadata: dict[str, str] | None = None) -> str:
        """Write `df` (its index dropped) as Parquet to `uri` atomically. `metadata` is stored as
        key-value metadata in the Parquet schema."""
        return self.write_bytes(parquet_bytes(df, metadata), uri)

    def read_parquet(self, uri: str) -> pd.DataFrame:
        data = self.read_bytes(uri)
        try:
            return pq.read_table(io.BytesIO(data)).to_pandas()
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{uri} is not a readable Parquet file: {exc}") from exc

    def read_parquet_metadata(self, uri: str) -> dict[str, str]:
        """The key-value metadata of a Parquet file (pandas' own entry excluded)."""
        data = self.read_bytes(uri)
        try:
            raw = pq.read_schema(io.BytesIO(data)).metadata or {}
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{uri} is not a readable Parquet file: {exc}") from exc
        return {key.decode(): value.decode() for key, value in raw.items() if key != b"pandas"}

    def write_json(self, obj: Any, uri: str) -> str:
        """Write `obj` as indented JSON (sorted keys, UTF-8) to `uri` atomically."""
        text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False)
        return self.write_bytes((text + "\n").encode("utf-8"), uri)

    def read_json(self, uri: str) -> Any:
        data = self.read_bytes(uri)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{uri} is not valid JSON: {exc}") from exc

    def exists(self, uri: str) -> bool:
        """True if a file or a non-empty folder is at `uri`. Connection errors raise, never read as False."""
        path = self._path(uri)
        with _storage_errors("check", uri):
            if self.protocol == "file":
                return os.path.exists(path)
            return bool(self.fs.exists(path))

    def ls(self, uri: str) -> list[str]:
        """URIs of the direct children of the folder `uri`, sorted; temporary files of unfinished
        writes are left out. A missing folder raises FileNotFoundError."""
        path = self._path(uri)
        with _storage_errors("list", uri):
            if self.protocol == "file" and not os.path.isdir(path):
                raise FileNotFoundError(path)
            children = self.fs.ls(path, detail=False)
        out = []
        for child in children:
            child = child.rstrip("/")
            name = child.rsplit("/", 1)[-1]
            if child == path or _is_temp_name(name):
                continue
            out.append(self._uri(child))
        return sorted(out)

    def rm(self, uri: str) -> None:
        """Remove a file or a whole folder; a missing one is not an error."""
        path = self._path(uri)
        with _storage_errors("remove", uri):
            if self.protocol == "file":
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                elif os.path.lexists(path):
                    os.remove(path)
                return
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)

    def put_dir(self, local: str | os.PathLike, uri: str, last: Sequence[str] = (MANIFEST_FILE,)) -> str:
        """Upload the folder `local` to `uri`, replacing what was there.

        Each file is written atomically; the top-level files named in `last` (the folder's
        completeness marker, `manifest.json` by default) go after all others, so a reader that
        waits for the marker sees a complete folder.
        """
        local = os.fspath(local)
        if not os.path.isdir(local):
            raise NotADirectoryError(errno.ENOTDIR, f"put_dir: {local} is not a folder", local)
        files = []
        for directory, _, names in os.walk(local):
            for name in names:
                files.append(os.path.relpath(os.path.join(directory, name), local).replace(os.sep, "/"))
        files.sort(key=lambda rel: (rel in last, rel))
        self.rm(uri)
        for rel in files:
            source = os.path.join(local, rel)
            target = self.join(uri, rel)
            if self.protocol == "file":
                with open(source, "rb") as handle:
                    # Checkpoints are at most a few GB on the hosts that write them locally.
                    self.write_bytes(handle.read(), target)
            else:
                with _storage_errors("upload to", target):
                    self.fs.put_file(source, self._path(target))
        return uri

    def get_dir(self, uri: str, local: str | os.PathLike) -> str:
        """Download the folder `uri` into `local` (replacing it). The files land in a temporary
        folder beside `local` that is renamed into place at the end, so `local` is whole or absent."""
        local = os.path.abspath(os.fspath(local))
        path = self._path(uri)
        with _storage_errors("download", uri):
            if not self.exists(uri):
                raise FileNotFoundError(path)
            found = self.fs.find(path)
        parent, name = os.path.split(local)
        os.makedirs(parent, exist_ok=True)
        temp = os.path.join(parent, _temp_name(name))
        try:
            for remote in found:
                rel = remote[len(path):].lstrip("/")
                if not rel or any(_is_temp_name(part) for part in rel.split("/")):
                    continue
                target = os.path.join(temp, *rel.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with _storage_errors("download", self._uri(remote)):
                    self.fs.get_file(remote, target)
            os.makedirs(temp, exist_ok=True)
            if os.path.isdir(local):
                shutil.rmtree(local)
            os.replace(temp, local)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        return local


def parquet_bytes(df: pd.DataFrame, metadata: dict[str, str] | None = None) -> bytes:
    """`df` (index dropped) serialised as Parquet, with optional key-value schema metadata."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({key.encode(): value.encode() for key, value in metadata.items()})
        table = table.replace_schema_metadata(merged)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------
# artifacts: data.parquet + manifest.json, optionally built from shards

ARTIFACT_FORMAT = "metareward.artifact/1"
DATA_FILE = "data.parquet"
SHARDS_DIR = "shards"
PLAN_FILE = "plan.json"
_SHARD_FILE = re.compile(r"^shard-(\d{5,})\.parquet$")
_SHARD_METADATA_KEY = "metareward.shard"


class ArtifactInfo(BaseModel):
    """What an artifact was made from; copied into its manifest.

    Parameters:
        stage (`str`):
            The stage that wrote it (`generate`, `judge`, ...).
        schema_version (`int`):
            `metareward.schema.SCHEMA_VERSION` of the columns written.
        fingerprint (`str`):
            Identity of everything the rows depend on (e.g. the stage's cache key: checkpoint hash,
            stage config hash, upstream keys). Shards or a finished artifact found under the same
            URI with another fingerprint are stale and are discarded before writing.
        checkpoint_sha256 (`str` or `None`, *optional*, defaults to `None`):
            sha256 of the checkpoint that produced the rows (`None` for stages without a model).
        config (`dict`, *optional*, defaults to `{}`):
            The stage's config as plain JSON values.
        upstream (`dict[str, str]`, *optional*, defaults to `{}`):
            URIs of the artifacts this one was computed from, by role.
    """

    model_config = ConfigDict(extra="forbid")

    stage: str
    schema_version: int
    fingerprint: str = Field(min_length=1)
    checkpoint_sha256: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    upstream: dict[str, str] = Field(default_factory=dict)


def is_complete(store: Store, uri: str) -> bool:
    """True once the artifact at `uri` has its manifest (written last)."""
    return store.exists(store.join(uri, MANIFEST_FILE))


def read_manifest(store: Store, uri: str) -> dict[str, Any]:
    return store.read_json(store.join(uri, MANIFEST_FILE))


def read_artifact(store: Store, uri: str) -> pd.DataFrame:
    """The table of a complete artifact; an incomplete one raises FileNotFoundError naming the URI."""
    if not is_complete(store, uri):
        raise FileNotFoundError(errno.ENOENT, f"artifact {uri} is not complete (no {MANIFEST_FILE})", uri)
    return store.read_parquet(store.join(uri, DATA_FILE))


def write_artifact(
    store: Store, uri: str, df: pd.DataFrame, info: ArtifactInfo, timings: dict[str, float] | None = None
) -> dict[str, Any]:
    """Write a one-piece artifact: `data.parquet`, then `manifest.json`. Returns the manifest."""
    started = time.time()
    data_uri = store.join(uri, DATA_FILE)
    store.rm(store.join(uri, MANIFEST_FILE))  # an old manifest must not vouch for new data
    data = parquet_bytes(df)
    store.write_bytes(data, data_uri)
    manifest = _manifest(
        uri, df, data, info, shard_rows=[len(df)], timings={**(timings or {}), "write_seconds": time.time() - started}
    )
    store.write_json(manifest, store.join(uri, MANIFEST_FILE))
    return manifest


def _manifest(
    uri: str,
    df: pd.DataFrame,
    data: bytes,
    info: ArtifactInfo,
    shard_rows: list[int],
    timings: dict[str, Any],
) -> dict[str, Any]:
    return {
        "format": ARTIFACT_FORMAT,
        "uri": uri,
        "data": DATA_FILE,
        "data_sha256": hashlib.sha256(data).hexdigest(),
        "rows": int(len(df)),
        "columns": {str(name): str(dtype) for name, dtype in df.dtypes.items()},
        "shard_count": len(shard_rows),
        "shard_rows": [int(n) for n in shard_rows],
        "created_at": _now(),
        "timings": timings,
        **info.model_dump(mode="json"),
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class ShardedArtifact:
    """An artifact written in `shard_count` shards, each committed atomically on its own.

    Files under `uri`:
        shards/plan.json            shard count and fingerprint, written when the artifact is opened
        shards/shard-00003.parquet  shard 3's rows; its Parquet metadata key `metareward.shard` holds
                                    {"index", "rows", "seconds", "fingerprint", "written_at"}
        data.parquet                all shards concatenated in index order (written by `finalize`)
        manifest.json               written last by `finalize`; the shards folder is removed after it

    Opening resumes: `pending_shards()` lists the shards not yet in storage, so a killed stage
    redoes only the shard that was in flight. Opening with another fingerprint or shard count (the
    inputs changed) discards the stale shards and any finished artifact there; `fresh=True`
    discards everything regardless.

    Typical use:

        artifact = ShardedArtifact(store, uri, shard_count, info)
        for index in artifact.pending_shards():
            artifact.write_shard(index, compute(index), seconds=...)
        manifest = artifact.finalize(key_columns=["response_id"])
    """

    def __init__(self, store: Store, uri: str, shard_count: int, info: ArtifactInfo, fresh: bool = False):
        if not isinstance(shard_count, int) or isinstance(shard_count, bool) or shard_count < 1:
            raise ValueError(f"shard_count must be an integer >= 1, got {shard_count!r}")
        self.store = store
        self.uri = uri.rstrip("/")
        self.shard_count = shard_count
        self.info = info
        self._shards_uri = store.join(self.uri, SHARDS_DIR)
        self._plan = {"fingerprint": info.fingerprint, "shard_count": shard_count}
        if fresh:
            store.rm(self.uri)
        elif is_complete(store, self.uri):
            manifest = read_manifest(store, self.uri)
            if manifest.get("fingerprint") == info.fingerprint and manifest.get("shard_count") == shard_count:
                # a finalize killed between the manifest and the clean-up leaves shards behind
                store.rm(self._shards_uri)
                return
            logger.warning(
                "artifact %s was made from other inputs (fingerprint %s, %s shards); discarding it",
                self.uri, manifest.get("fingerprint"), manifest.get("shard_count"),
            )
            store.rm(self.uri)
        plan_uri = store.join(self._shards_uri, PLAN_FILE)
        if store.exists(plan_uri):
            plan = store.read_json(plan_uri)
            if {key: plan.get(key) for key in self._plan} == self._plan:
                return
            logger.warning(
                "shards under %s were made from other inputs (fingerprint %s, %s shards); discarding them",
                self.uri, plan.get("fingerprint"), plan.get("shard_count"),
            )
            store.rm(self.uri)
        store.write_json({**self._plan, "created_at": _now(), "started": time.time()}, plan_uri)

    def is_complete(self) -> bool:
        return is_complete(self.store, self.uri)

    def shard_uri(self, index: int) -> str:
        return self.store.join(self._shards_uri, f"shard-{index:05d}.parquet")

    def done_shards(self) -> list[int]:
        """Shard indices already committed to storage (all of them once the artifact is complete)."""
        if self.is_complete():
            return list(range(self.shard_count))
        if not self.store.exists(self._shards_uri):
            return []
        done = []
        for child in self.store.ls(self._shards_uri):
            match = _SHARD_FILE.match(child.rsplit("/", 1)[-1])
            if match and int(match.group(1)) < self.shard_count:
                done.append(int(match.group(1)))
        return sorted(done)

    def pending_shards(self) -> list[int]:
        """Shard indices still to write, ascending, read from storage on each call."""
        done = set(self.done_shards())
        return [index for index in range(self.shard_count) if index not in done]

    def write_shard(self, index: int, df: pd.DataFrame, seconds: float | None = None) -> str:
        """Commit shard `index` (atomically; rewriting a shard replaces it). `seconds` is the work
        time of the shard, recorded in the manifest's timings."""
        if not isinstance(index, int) or not 0 <= index < self.shard_count:
            raise ValueError(f"shard index {index!r} is outside 0..{self.shard_count - 1} for {self.uri}")
        if self.is_complete():
            raise ValueError(f"artifact {self.uri} is already complete; open it with fresh=True to rewrite it")
        meta = {
            "index": index,
            "rows": int(len(df)),
            "seconds": None if seconds is None else float(seconds),
            "fingerprint": self.info.fingerprint,
            "written_at": time.time(),
        }
        return self.store.write_parquet(df, self.shard_uri(index), metadata={_SHARD_METADATA_KEY: json.dumps(meta)})

    def finalize(self, key_columns: Sequence[str] | None = None) -> dict[str, Any]:
        """Concatenate the shards into `data.parquet`, write `manifest.json` last, remove the shards.

        Every shard must be present, made under this fingerprint, and have the same columns; with
        `key_columns`, no key may occur twice in the result. Returns the manifest. Finalizing a
        complete artifact returns its manifest unchanged.
        """
        if self.is_complete():
            return read_manifest(self.store, self.uri)
        pending = self.pending_shards()
        if pending:
            raise ValueError(f"cannot finalize {self.uri}: shards {pending} are not written yet")
        started = time.time()
        frames, shard_rows, shard_seconds, first_written = [], [], {}, None
        columns: list[str] | None = None
        for index in range(self.shard_count):
            shard_uri = self.shard_uri(index)
            meta = json.loads(self.store.read_parquet_metadata(shard_uri).get(_SHARD_METADATA_KEY, "{}"))
            if meta.get("fingerprint") != self.info.fingerprint:
                raise ValueError(
                    f"{shard_uri} was written under fingerprint {meta.get('fingerprint')!r}, "
                    f"not {self.info.fingerprint!r}; reopen the artifact with fresh=True"
                )
            frame = self.store.read_parquet(shard_uri)
            if columns is None:
                columns = list(frame.columns)
            elif list(frame.columns) != columns:
                raise ValueError(f"{shard_uri} has columns {list(frame.columns)}, shard 0 has {columns}")
            frames.append(frame)
            shard_rows.append(len(frame))
            if meta.get("seconds") is not None:
                shard_seconds[str(index)] = meta["seconds"]
            if meta.get("written_at") is not None:
                first_written = min(first_written or meta["written_at"], meta["written_at"])
        nonempty = [frame for frame in frames if len(frame)] or frames[:1]
        data = pd.concat(nonempty, ignore_index=True) if len(nonempty) > 1 else nonempty[0].reset_index(drop=True)
        if key_columns:
            missing = [column for column in key_columns if column not in data.columns]
            if missing:
                raise ValueError(f"cannot finalize {self.uri}: key columns {missing} are not in the shards' columns {columns}")
            duplicated = data.duplicated(subset=list(key_columns), keep=False)
            if duplicated.any():
                repeated = data.loc[duplicated, list(key_columns)].drop_duplicates()
                sample = repeated.head(3).to_dict(orient="records")
                raise ValueError(
                    f"cannot finalize {self.uri}: {len(repeated)} key(s) {list(key_columns)} occur on more than "
                    f"one row ({int(duplicated.sum())} rows), e.g. {sample}"
                )
        data_bytes = parquet_bytes(data)
        self.store.write_bytes(data_bytes, self.store.join(self.uri, DATA_FILE))
        plan = self.store.read_json(self.store.join(self._shards_uri, PLAN_FILE))
        finished = time.time()
        timings = {
            "shard_seconds": shard_seconds,
            "work_seconds": float(sum(shard_seconds.values())),
            "finalize_seconds": finished - started,
            # from opening the artifact the first time to now, across resumes
            "wall_seconds": finished - float(plan.get("started", first_written or started)),
        }
        manifest = _manifest(self.uri, data, data_bytes, self.info, shard_rows, timings)
        self.store.write_json(manifest, self.store.join(self.uri, MANIFEST_FILE))
        self.store.rm(self._shards_uri)
        return manifest

    def read(self) -> pd.DataFrame:
        return read_artifact(self.store, self.uri)

    def __repr__(self) -> str:
        return f"ShardedArtifact({self.uri!r}, shard_count={self.shard_count})"
