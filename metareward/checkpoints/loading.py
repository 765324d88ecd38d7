"""Saving (`save_checkpoint`, atomic), publishing to an object store, and verified loading
(`materialize`: a remote checkpoint downloaded once into the local cache keyed by its sha256)."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from metareward.checkpoints.manifest import (
    _checkpoint_file_names,
    _existing_folder,
    _load_local_manifest,
    _read_manifest,
    _refuse_pickles,
    _remember_verified,
    _verify_local,
    _write_manifest,
)
from metareward.checkpoints.ref import (
    MANIFEST_NAME,
    CheckpointError,
    ModelRef,
    cache_root,
    _is_local_uri,
    _local_path,
    filesystem_and_path,
)

logger = logging.getLogger(__name__)


# --- saving ------------------------------------------------------------------------------------


def _default_source(model: Any) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {
        "kind": "save_checkpoint",
        "model_class": type(model).__name__,
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "transformers": importlib.metadata.version("transformers"),
    }


def _write_folder(model: Any, tokenizer: Any, folder: Path, source: dict[str, Any]) -> str:
    folder.mkdir(parents=True)
    model.save_pretrained(folder)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(folder)
    return _write_manifest(folder, source)


def save_checkpoint(
    model: Any,
    tokenizer: Any,
    dest_uri: str,
    fs: fsspec.AbstractFileSystem | None = None,
    source: dict[str, Any] | None = None,
) -> ModelRef:
    """Save `model` and `tokenizer` (transformers objects) as a hashed checkpoint at `dest_uri`.

    `dest_uri` is a local folder or an fsspec URL (`s3://bucket/run/iter-1/model`); `fs` is an fsspec
    filesystem already configured with the endpoint and credentials (default: from the URL).
    `source` goes into the manifest (default: the model class, its name_or_path and the
    transformers version). An existing checkpoint at `dest_uri` is replaced (a retried training
    task rewrites its output); readers never see a half-written one (see the module docstring).
    """
    source = source or _default_source(model)
    local = isinstance(fs, LocalFileSystem) if fs is not None else _is_local_uri(dest_uri)
    if local:
        destination = _local_path(dest_uri)
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = destination.parent / f".{destination.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            sha256 = _write_folder(model, tokenizer, staging, source)
            if destination.exists():
                retired = destination.parent / f".{destination.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(destination, retired)
                os.rename(staging, destination)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.rename(staging, destination)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _remember_verified(destination, sha256)
        logger.info("saved checkpoint %s (sha256 %s)", destination, sha256)
        return ModelRef(uri=str(destination), sha256=sha256)

    remote_fs, remote_root = filesystem_and_path(dest_uri, fs)
    with tempfile.TemporaryDirectory(prefix="metareward-save-") as scratch:
        staging = Path(scratch) / "checkpoint"
        sha256 = _write_folder(model, tokenizer, staging, source)
        _upload(staging, remote_fs, remote_root)
    uri = remote_fs.unstrip_protocol(remote_root)
    logger.info("saved checkpoint %s (sha256 %s)", uri, sha256)
    return ModelRef(uri=uri, sha256=sha256)


def publish_checkpoint(ref: ModelRef, dest_uri: str, fs: fsspec.AbstractFileSystem | None = None) -> ModelRef:
    """A copy of the local checkpoint `ref` in object storage at `dest_uri`, for workers on other
    machines (the seed model of a Ray cluster run). The folder is verified against `ref.sha256`
    first; an upload already there with that hash is reused."""
    if not _is_local_uri(ref.uri):
        return ref
    folder = _local_path(ref.uri)
    _verify_local(folder, ref.sha256)
    remote_fs, remote_root = filesystem_and_path(dest_uri, fs)
    manifest_key = f"{remote_root}/{MANIFEST_NAME}"
    if not (remote_fs.exists(manifest_key) and _read_manifest(remote_fs.cat_file(manifest_key), manifest_key).get("sha256") == ref.sha256):
        _upload(folder, remote_fs, remote_root)
        logger.info("published checkpoint %s to %s", folder, dest_uri)
    return ModelRef(uri=remote_fs.unstrip_protocol(remote_root), sha256=ref.sha256)


def _upload(folder: Path, remote_fs: fsspec.AbstractFileSystem, remote_root: str) -> None:
    """Upload a checkpoint folder: old manifest removed first, new manifest last."""
    manifest_key = f"{remote_root}/{MANIFEST_NAME}"
    remote_fs.invalidate_cache(remote_root)
    if remote_fs.exists(manifest_key):
        remote_fs.rm_file(manifest_key)
    names = _checkpoint_file_names(folder)
    if remote_fs.exists(remote_root):
        stale = [path for path in remote_fs.ls(remote_root, detail=False) if path.rsplit("/", 1)[-1] not in names]
        for path in stale:
            remote_fs.rm(path, recursive=True)
    for name in names:
        remote_fs.put_file(str(folder / name), f"{remote_root}/{name}")
    remote_fs.put_file(str(folder / MANIFEST_NAME), manifest_key)
    remote_fs.invalidate_cache(remote_root)


# --- loading -----------------------------------------------------------------------------------


def materialize(
    ref: ModelRef,
    fs: fsspec.AbstractFileSystem | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A verified local folder holding the checkpoint `ref`, ready for `from_pretrained`.

    A local ref is verified in place. A remote ref is downloaded once into
    `{cache_root(cache_dir)}/checkpoints/{sha256}` and verified there; later calls reuse it.
    Raises `CheckpointError` for a missing folder or manifest, pickle-capable weights, or content
    that does not hash to `ref.sha256`.
    """
    if ref.is_local:
        folder = _local_path(ref.uri)
        _verify_local(folder, ref.sha256)
        return folder

    cached = cache_root(cache_dir) / "checkpoints" / ref.sha256
    if cached.exists():
        try:
            _verify_local(cached, ref.sha256)
            return cached
        except CheckpointError as error:
            logger.warning("cached copy of %s is damaged (%s); downloading it again", ref.uri, error)
            shutil.rmtree(cached, ignore_errors=True)

    remote_fs, remote_root = filesystem_and_path(ref.uri, fs)
    try:
        manifest_bytes = remote_fs.cat_file(f"{remote_root}/{MANIFEST_NAME}")
    except FileNotFoundError as error:
        raise CheckpointError(
            f"checkpoint {ref.uri}: no {MANIFEST_NAME} (the checkpoint is not there, or its upload has not finished)"
        ) from error
    manifest = _read_manifest(manifest_bytes, ref.uri)
    if manifest["sha256"] != ref.sha256:
        raise CheckpointError(
            f"checkpoint {ref.uri}: the manifest says sha256 {manifest['sha256']}, the ModelRef expects {ref.sha256} "
            "(the location holds another checkpoint)"
        )
    names = [entry["name"] for entry in manifest["files"]]
    _refuse_pickles(names, ref.uri)
    if any("/" in name or name.startswith(".") or name == MANIFEST_NAME for name in names):
        raise CheckpointError(f"checkpoint {ref.uri}: the manifest lists a file name that is not a plain file name")

    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = cached.parent / f".{ref.sha256}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        for name in names:
            try:
                remote_fs.get_file(f"{remote_root}/{name}", str(staging / name))
            except FileNotFoundError as error:
                raise CheckpointError(f"checkpoint {ref.uri}: {name} listed in the manifest but missing") from error
        (staging / MANIFEST_NAME).write_bytes(manifest_bytes)
        try:
            _verify_local(staging, ref.sha256)
        except CheckpointError as error:
            raise CheckpointError(f"checkpoint {ref.uri} (downloaded to {staging}): {error}") from error
        try:
            os.rename(staging, cached)
            _remember_verified(cached, ref.sha256)
        except OSError:
            # Another process finished the same download first; verify its copy instead.
            if not cached.exists():
                raise
            _verify_local(cached, ref.sha256)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("downloaded checkpoint %s to %s", ref.uri, cached)
    return cached


def ref_from_folder(path: str | os.PathLike) -> ModelRef:
    """The ModelRef of a user's own Hugging Face format checkpoint folder.

    Writes the manifest when the folder has none. When it has one, the folder must still match it
    (delete the manifest to accept changed contents). Refuses pickle-capable weights and folders
    without `config.json` or `*.safetensors`.
    """
    folder = _existing_folder(path)
    names = _checkpoint_file_names(folder)
    _refuse_pickles(names, str(folder))
    if (folder / MANIFEST_NAME).is_file():
        manifest = _load_local_manifest(folder)
        try:
            _verify_local(folder, manifest["sha256"])
        except CheckpointError as error:
            raise CheckpointError(
                f"{error}; if you changed the checkpoint on purpose, delete {folder / MANIFEST_NAME} to re-hash it"
            ) from error
        return ModelRef(uri=str(folder), sha256=manifest["sha256"])
    try:
        sha256 = _write_manifest(folder, {"kind": "local-folder", "path": str(folder)})
    except PermissionError as error:
        raise CheckpointError(
            f"checkpoint {folder}: cannot write {MANIFEST_NAME} there ({error}); copy the folder somewhere writable"
        ) from error
    return ModelRef(uri=str(folder), sha256=sha256)
