"""The store: one fsspec filesystem on a storage root (a local folder or S3), atomic writes.

Atomicity: no reader ever sees half a file. On a local folder a file is written under a temporary
name beside the target (`.{name}.tmp-{uuid}`) and renamed over it (`os.replace`, atomic on POSIX).
On S3 an object is sent in one request (a single PUT, or a multipart upload that only appears
when it completes), so the object under the final name is always whole.

Credentials never appear in `repr(store)` or in this module's logs.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
from typing import Any, Sequence

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from metareward.storage.config import StorageConfig
from metareward.storage.errors import _storage_errors
from metareward.storage.names import MANIFEST_FILE, _is_temp_name, _temp_name, _validate_segment, validate_run_name

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
