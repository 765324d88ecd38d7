"""What every stage function shares: where its artifacts live, its fingerprint and manifest
information, reading upstream tables, and small table helpers."""

from __future__ import annotations

from collections import Counter
from typing import Callable, Mapping, Sequence

import pandas as pd

from metareward import contract, prompt_sources
from metareward.checkpoints import ModelRef
from metareward.contract import Stage, StageSettings, fingerprint
from metareward.schema import SCHEMA_VERSION
from metareward.storage import ArtifactInfo, Store, read_artifact, read_manifest

ProgressCallback = Callable[[float], None]


def artifact_uri(store: Store, run: str, settings: StageSettings, name: str) -> str:
    """`{root}/{run}/iter-{i}/{name}`: where the artifact `name` of the settings' iteration lives."""
    return store.stage_uri(run, settings.iteration, name)  # type: ignore[attr-defined]


def artifact_key(store: Store, uri: str) -> str:
    """The fingerprint of the complete artifact at `uri` (from its manifest)."""
    return str(read_manifest(store, uri)["fingerprint"])


def input_digests(store: Store, stage: Stage, settings: StageSettings) -> dict[str, str]:
    """The content digests of the input files `stage` reads (the prompt pool for `sample_prompts`),
    so a file edited in place is another input."""
    if not stage.reads_prompt_pool:
        return {}
    return {"prompt_pool": prompt_sources.source_digest(settings.prompts.source, store=store)}  # type: ignore[attr-defined]


def stage_fingerprint(
    store: Store, stage: Stage, settings: StageSettings, model: ModelRef | None, upstream: Mapping[str, str]
) -> str:
    """`metareward.contract.fingerprint` of `stage` on these settings, checkpoint and upstream
    fingerprints (by role): the manifest key of its artifacts and its Prefect cache key."""
    sha256 = model.sha256 if model is not None else None
    return fingerprint(stage, settings, sha256, upstream, input_digests(store, stage, settings))


def stage_info(
    store: Store,
    stage: Stage,
    settings: StageSettings,
    model: ModelRef | None,
    upstream: Mapping[str, str],
    keys: Mapping[str, str] | None = None,
) -> ArtifactInfo:
    """What every artifact of `stage` records: its fingerprint, settings and checkpoint, and the
    upstream artifacts (by role) it was computed from. The upstream keys are read from their
    manifests unless given."""
    keys = {role: artifact_key(store, uri) for role, uri in upstream.items()} if keys is None else keys
    return ArtifactInfo(
        stage=stage.name,
        schema_version=SCHEMA_VERSION,
        pipeline_version=contract.PIPELINE_VERSION,
        fingerprint=stage_fingerprint(store, stage, settings, model, keys),
        checkpoint_sha256=model.sha256 if model is not None and stage.uses_checkpoint else None,
        config=settings.model_dump(mode="json"),
        upstream=dict(upstream),
    )


def read_tables(store: Store, uris: Mapping[str, str]) -> dict[str, pd.DataFrame]:
    """The tables of complete upstream artifacts, by artifact name."""
    return {name: read_artifact(store, uri) for name, uri in uris.items()}


def checkpoint_fs(store: Store):
    """The filesystem checkpoints are reached through: None (plain paths) for a local store."""
    return None if store.protocol == "file" else store.fs


def report_progress(progress: ProgressCallback | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done / total if total else 1.0)


def user_turn(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def value_counts(values: pd.Series, known: Sequence[str]) -> dict[str, int]:
    """Counts of each value, the `known` ones first (0 when absent)."""
    counted = Counter(values.astype(str))
    return {value: int(counted.get(value, 0)) for value in known} | {
        value: int(count) for value, count in counted.items() if value not in known
    }


def empty_table(columns: Sequence[str], dtypes: Mapping[str, str] | None = None) -> pd.DataFrame:
    """A shard without rows, with the artifact's columns (text unless `dtypes` says otherwise)."""
    dtypes = dtypes or {}
    return pd.DataFrame({column: pd.Series(dtype=dtypes.get(column, "str")) for column in columns})


def no_cap(cap: int) -> int | None:
    """Caps are 0 for "no cap" in the config, None in the core functions."""
    return cap if cap > 0 else None
