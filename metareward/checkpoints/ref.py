"""`ModelRef(uri, sha256)`: a checkpoint by location and content; where checkpoints live (local or
remote, the local cache folder)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import fsspec
from pydantic import BaseModel, ConfigDict, Field, field_validator

MANIFEST_NAME = "metareward-manifest.json"
# The LoRA adapter of M_i lives beside it at {run}/iter-{i}/adapter (a LoRA of M_{i-1}: pruned with M_i).
ADAPTER_NAME = "adapter"
MANIFEST_FORMAT = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz")


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete, not safetensors, or not the one its ModelRef names."""


class ModelRef(BaseModel):
    """A checkpoint by location and content: small, hashable, usable as a Prefect cache key.

    Parameters:
        uri (`str`):
            An absolute local folder path, or an fsspec URL of a folder in an object store
            (`s3://bucket/run/iter-1/model`), without a trailing slash.
        sha256 (`str`):
            The checkpoint's content hash (`hash_checkpoint`), 64 lowercase hex digits.
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", json_schema_extra={"description": "A checkpoint by location (`uri`) and content (`sha256`)."}
    )

    uri: str = Field(description="A local folder's absolute path or a folder's fsspec URL (`s3://...`), no trailing slash.")
    sha256: str = Field(description="The checkpoint's content hash, 64 lowercase hex digits.")

    @field_validator("uri")
    @classmethod
    def _uri_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("uri is empty")
        return value.rstrip("/") or value

    @field_validator("sha256")
    @classmethod
    def _sha256_hex(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {value!r}")
        return value

    @property
    def is_local(self) -> bool:
        return _is_local_uri(self.uri)



# --- locations ---------------------------------------------------------------------------------


def _is_local_uri(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).expanduser().absolute()


def filesystem_and_path(uri: str, fs: fsspec.AbstractFileSystem | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it of a remote `uri` (`fs` as given, else from the URL)."""
    if fs is None:
        return fsspec.core.url_to_fs(uri)
    return fs, fsspec.core.strip_protocol(uri).rstrip("/")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The local cache folder: `cache_dir`, else `$METAREWARD_CACHE`, else `~/.cache/metareward`."""
    chosen = cache_dir or os.environ.get("METAREWARD_CACHE") or "~/.cache/metareward"
    return Path(chosen).expanduser().absolute()
