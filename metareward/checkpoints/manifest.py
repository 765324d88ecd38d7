"""Checkpoint hashing (`hash_checkpoint`), the manifest `metareward-manifest.json`, and the
verification of a local folder against a ref's sha256 (remembered per folder state)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from metareward.checkpoints.ref import MANIFEST_FORMAT, MANIFEST_NAME, PICKLE_SUFFIXES, CheckpointError

_HASH_HEADER = b"metareward-checkpoint-v1\n"
_CHUNK_BYTES = 1 << 20


# --- hashing ---------------------------------------------------------------------------------


def _checkpoint_file_names(folder: Path) -> list[str]:
    """The checkpoint's files: top-level regular files, no manifest, no hidden files; sorted."""
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.is_file() and entry.name != MANIFEST_NAME and not entry.name.startswith(".")
    )


def _refuse_pickles(names: list[str], where: str) -> None:
    pickles = [name for name in names if name.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise CheckpointError(
            f"checkpoint {where}: {', '.join(pickles)} is not safetensors (a pickle-capable format that "
            "can run code when loaded); metareward loads safetensors weights only: convert the weights "
            "with save_pretrained(...) (transformers writes safetensors) and remove these files"
        )


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _combine(entries: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256(_HASH_HEADER)
    for entry in entries:
        digest.update(f"{entry['name']}\t{entry['size']}\t{entry['sha256']}\n".encode())
    return digest.hexdigest()


def _hash_entries(folder: Path, names: list[str]) -> list[dict[str, Any]]:
    return [{"name": name, "size": (folder / name).stat().st_size, "sha256": _hash_file(folder / name)} for name in names]


def hash_checkpoint(path: str | os.PathLike) -> str:
    """The sha256 of the checkpoint folder `path` (see the module docstring for what it covers).

    Streams every file in 1 MiB chunks. Raises `CheckpointError` when the folder is missing or
    holds pickle-capable weights.
    """
    folder = _existing_folder(path)
    names = _checkpoint_file_names(folder)
    _refuse_pickles(names, str(folder))
    return _combine(_hash_entries(folder, names))


# --- manifests and local verification --------------------------------------------------------

# (folder, ((name, size, mtime_ns), ...), sha256) of folders verified in this process.
_verified_states: set[tuple[str, tuple[tuple[str, int, int], ...], str]] = set()
_verified_lock = threading.Lock()


def _existing_folder(path: str | os.PathLike) -> Path:
    folder = Path(path).expanduser().absolute()
    if not folder.exists():
        raise CheckpointError(f"checkpoint {folder}: folder not found")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder}: not a folder")
    return folder


def _folder_state(folder: Path, names: list[str]) -> tuple[tuple[str, int, int], ...]:
    state = []
    for name in names:
        stat = (folder / name).stat()
        state.append((name, stat.st_size, stat.st_mtime_ns))
    return tuple(state)


def _read_manifest(text: str | bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(text)
        files = manifest["files"]
        sha256 = manifest["sha256"]
        if not isinstance(files, list) or not all(isinstance(entry["name"], str) for entry in files):
            raise TypeError("files is not a list of {name, size, sha256}")
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {where}: {MANIFEST_NAME} is unreadable ({error})") from error
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(
            f"checkpoint {where}: {MANIFEST_NAME} has format {manifest.get('format')!r}, this version reads {MANIFEST_FORMAT}"
        )
    if not isinstance(sha256, str):
        raise CheckpointError(f"checkpoint {where}: {MANIFEST_NAME} has no sha256")
    return manifest


def _load_local_manifest(folder: Path) -> dict[str, Any]:
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointError(
            f"checkpoint {folder}: no {MANIFEST_NAME} (not written by metareward, or its writing did not finish); "
            "for a checkpoint folder of your own, name it as the model (resolve_model / ref_from_folder) "
            "so its manifest is written"
        )
    return _read_manifest(manifest_path.read_bytes(), str(folder))


def _compare_to_manifest(folder: Path, names: list[str], manifest: dict[str, Any], entries: list[dict] | None) -> None:
    """Name the first difference between the folder and its manifest; `entries` are fresh digests."""
    listed = {entry["name"]: entry for entry in manifest["files"]}
    missing = sorted(set(listed) - set(names))
    extra = sorted(set(names) - set(listed))
    if missing:
        raise CheckpointError(f"checkpoint {folder}: {', '.join(missing)} listed in the manifest but missing")
    if extra:
        raise CheckpointError(f"checkpoint {folder}: {', '.join(extra)} not in the manifest (added after it was written)")
    for name in names:
        size = (folder / name).stat().st_size
        if size != listed[name].get("size"):
            raise CheckpointError(
                f"checkpoint {folder}: {name} has {size} bytes, the manifest says {listed[name].get('size')} (file changed)"
            )
    for entry in entries or []:
        if entry["sha256"] != listed[entry["name"]].get("sha256"):
            raise CheckpointError(
                f"checkpoint {folder}: {entry['name']} does not match its sha256 in the manifest (file changed or corrupt)"
            )


def _verify_local(folder: Path, expected_sha256: str) -> None:
    """Raise `CheckpointError` unless `folder` is a complete checkpoint whose content hashes to `expected_sha256`."""
    folder = _existing_folder(folder)
    manifest = _load_local_manifest(folder)
    names = _checkpoint_file_names(folder)
    _refuse_pickles(names, str(folder))
    if manifest["sha256"] != expected_sha256:
        raise CheckpointError(
            f"checkpoint {folder}: the manifest says sha256 {manifest['sha256']}, the ModelRef expects "
            f"{expected_sha256} (the folder holds another checkpoint)"
        )
    state = _folder_state(folder, names)
    key = (str(folder), state, expected_sha256)
    with _verified_lock:
        if key in _verified_states:
            return
    _compare_to_manifest(folder, names, manifest, entries=None)
    entries = _hash_entries(folder, names)
    _compare_to_manifest(folder, names, manifest, entries)
    actual = _combine(entries)
    if actual != expected_sha256:
        raise CheckpointError(f"checkpoint {folder}: content hashes to {actual}, expected {expected_sha256}")
    # The state read before hashing: a file rewritten while we hashed gets re-verified next time.
    with _verified_lock:
        _verified_states.add(key)


def _write_manifest(folder: Path, source: dict[str, Any]) -> str:
    """Hash `folder`, write its manifest atomically, return the sha256."""
    names = _checkpoint_file_names(folder)
    _refuse_pickles(names, str(folder))
    if "config.json" not in names:
        raise CheckpointError(f"checkpoint {folder}: no config.json (not a Hugging Face format checkpoint)")
    if not any(name.endswith(".safetensors") for name in names):
        raise CheckpointError(f"checkpoint {folder}: no *.safetensors weights")
    entries = _hash_entries(folder, names)
    sha256 = _combine(entries)
    manifest = {
        "format": MANIFEST_FORMAT,
        "sha256": sha256,
        "files": entries,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
    }
    temporary = folder / f".{MANIFEST_NAME}.tmp-{uuid.uuid4().hex[:8]}"
    temporary.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(temporary, folder / MANIFEST_NAME)
    _remember_verified(folder, sha256)
    return sha256


def _remember_verified(folder: Path, sha256: str) -> None:
    """Record `folder` as verified in its current state (a rename keeps names, sizes and mtimes)."""
    names = _checkpoint_file_names(folder)
    with _verified_lock:
        _verified_states.add((str(folder), _folder_state(folder, names), sha256))
