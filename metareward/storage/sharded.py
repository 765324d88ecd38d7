"""Sharded artifacts: each shard committed atomically on its own, concatenated by `finalize`."""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any, Sequence

import pandas as pd

from metareward.storage.artifacts import (
    DATA_FILE,
    ArtifactInfo,
    _manifest,
    _now,
    is_complete,
    read_artifact,
    read_manifest,
)
from metareward.storage.names import MANIFEST_FILE
from metareward.storage.store import Store, parquet_bytes

logger = logging.getLogger(__name__)

SHARDS_DIR = "shards"
PLAN_FILE = "plan.json"
_SHARD_FILE = re.compile(r"^shard-(\d{5,})\.parquet$")
_SHARD_METADATA_KEY = "metareward.shard"


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
