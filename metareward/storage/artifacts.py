"""Artifacts: `data.parquet` + `manifest.json` (written last: the artifact is complete once it exists)."""

from __future__ import annotations

import errno
import hashlib
import time
from datetime import datetime, timezone
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from metareward.storage.names import MANIFEST_FILE
from metareward.storage.store import Store, parquet_bytes

# ----------------------------------------------------------------------------------------------
# artifacts: data.parquet + manifest.json (sharded ones: metareward.storage.sharded)

ARTIFACT_FORMAT = "metareward.artifact/1"
DATA_FILE = "data.parquet"


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
        pipeline_version (`str` or `None`, *optional*, defaults to `None`):
            `metareward.contract.PIPELINE_VERSION` of the code that wrote it (None: written before
            manifests recorded it, by pipeline version 1).
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
    pipeline_version: str | None = None
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
