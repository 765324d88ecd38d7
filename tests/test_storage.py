"""metareward.storage against a local folder and real S3 servers on 127.0.0.1 (moto, rclone serve s3)."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid

import pandas as pd
import pytest

from metareward.storage import (
    DATA_FILE,
    MANIFEST_FILE,
    ArtifactInfo,
    ShardedArtifact,
    StorageConfig,
    StorageError,
    Store,
    TransientStorageError,
    is_complete,
    is_transient_storage_error,
    read_artifact,
    read_manifest,
    validate_run_name,
    write_artifact,
)


@pytest.fixture(params=["local", "moto", "rclone"])
def store(request, tmp_path) -> Store:
    """A fresh store: a local folder, or a fresh prefix on one of the session's S3 servers."""
    if request.param == "local":
        return Store(StorageConfig(root=str(tmp_path / "runs")))
    server = request.getfixturevalue(f"{request.param}_s3")
    return Store(server.storage_config(prefix=f"t-{uuid.uuid4().hex[:10]}"))


def _info(fingerprint: str = "fp-1", **overrides) -> ArtifactInfo:
    fields = dict(
        stage="judge",
        schema_version=1,
        fingerprint=fingerprint,
        checkpoint_sha256="ab" * 32,
        config={"n": 3, "temperature": 0.8},
        upstream={"responses": "s3://bucket/run/iter-1/generate"},
    )
    fields.update(overrides)
    return ArtifactInfo(**fields)


def _shard_frame(index: int, rows: int = 4) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "response_id": [f"r{index}-{row}" for row in range(rows)],
            "score": [float(index * 10 + row) for row in range(rows)],
        }
    )


# ------------------------------------------------------------------------------------------------
# names, layout, config


@pytest.mark.parametrize(
    "name, problem",
    [
        ("", "must not be empty"),
        ("..", "'..'"),
        ("../escape", "path separator"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("/etc", "absolute path"),
        ("C:\\runs", "absolute path"),
        (".hidden", "starts with a dot"),
        ("run\x00x", "control characters"),
        ("run\nx", "control characters"),
        ("a..b", "'..'"),
        ("with space", "characters outside"),
        ("s3:bucket", "characters outside"),
        ("x" * 129, "longer than 128"),
    ],
)
def test_run_names_that_could_escape_the_root_are_refused(name, problem, tmp_path):
    with pytest.raises(ValueError, match="run name") as caught:
        validate_run_name(name)
    assert problem in str(caught.value)
    with pytest.raises(ValueError):
        Store(StorageConfig(root=str(tmp_path))).stage_uri(name, 1, "judge")


@pytest.mark.parametrize("name", ["demo", "run-1", "Run_2.v3", "a" * 128])
def test_plain_run_names_are_accepted(name):
    assert validate_run_name(name) == name


def test_layout_of_a_local_store(tmp_path):
    store = Store(StorageConfig(root=str(tmp_path / "runs")))
    assert store.root == str(tmp_path / "runs")
    assert store.run_uri("demo") == f"{tmp_path}/runs/demo"
    assert store.stage_uri("demo", 2, "judge") == f"{tmp_path}/runs/demo/iter-2/judge"
    assert store.checkpoint_uri("demo", 1) == f"{tmp_path}/runs/demo/iter-1/model"
    with pytest.raises(ValueError, match="stage name"):
        store.stage_uri("demo", 1, "../model")
    with pytest.raises(ValueError, match="iteration must be an integer >= 0"):
        store.stage_uri("demo", -1, "judge")
    with pytest.raises(ValueError, match="bad path part"):
        store.join(store.run_uri("demo"), "../other")
    relative = Store(StorageConfig())
    assert relative.root == os.path.abspath("./runs")


def test_layout_of_an_s3_store_and_bad_roots():
    store = Store(StorageConfig(root="s3://bucket/some/prefix/", endpoint_url="http://127.0.0.1:1"))
    assert store.stage_uri("demo", 3, "generate") == "s3://bucket/some/prefix/demo/iter-3/generate"
    with pytest.raises(ValueError, match="names no bucket"):
        Store(StorageConfig(root="s3://"))
    with pytest.raises(ValueError, match="protocol 'gcs' is not supported"):
        Store(StorageConfig(root="gcs://bucket/x"))
    with pytest.raises(ValueError, match="root must not be empty"):
        StorageConfig(root="  ")
    with pytest.raises(ValueError, match="extra"):
        StorageConfig(root="./runs", secret="x")
    with pytest.raises(ValueError, match="not an s3:// URI"):
        store.read_bytes("/etc/hostname")


def test_credentials_named_in_config_must_exist(monkeypatch):
    monkeypatch.delenv("MR_MISSING_KEY", raising=False)
    monkeypatch.setenv("MR_PRESENT_SECRET", "x" * 12)
    config = StorageConfig(root="s3://bucket", access_key_id_env="MR_MISSING_KEY", secret_access_key_env="MR_PRESENT_SECRET")
    with pytest.raises(ValueError, match="access_key_id_env names the environment variable 'MR_MISSING_KEY', which is not set"):
        Store(config)
    with pytest.raises(ValueError, match="set both access_key_id_env and secret_access_key_env"):
        Store(StorageConfig(root="s3://bucket", access_key_id_env="MR_PRESENT_SECRET"))


# ------------------------------------------------------------------------------------------------
# reads and writes on every backend


def test_round_trips_on_every_backend(store, tmp_path):
    uri = store.stage_uri("demo", 1, "generate")
    df = pd.DataFrame({"prompt_id": ["p1", "p2"], "response": ["héllo", "wörld"], "n_tokens": [3, 5]})
    store.write_parquet(df, store.join(uri, "table.parquet"))
    pd.testing.assert_frame_equal(store.read_parquet(store.join(uri, "table.parquet")), df)
    store.write_json({"rows": 2, "text": "ü"}, store.join(uri, "info.json"))
    assert store.read_json(store.join(uri, "info.json")) == {"rows": 2, "text": "ü"}
    # overwriting replaces the whole object
    store.write_json({"rows": 3}, store.join(uri, "info.json"))
    assert store.read_json(store.join(uri, "info.json")) == {"rows": 3}
    assert store.exists(store.join(uri, "table.parquet"))
    assert store.ls(uri) == [store.join(uri, "info.json"), store.join(uri, "table.parquet")]
    assert store.list_iterations("demo") == [1]
    store.write_json({}, store.join(store.stage_uri("demo", 12, "judge"), "x.json"))
    assert store.list_iterations("demo") == [1, 12]
    assert store.list_iterations("other") == []

    with pytest.raises(FileNotFoundError, match="missing.json") as caught:
        store.read_json(store.join(uri, "missing.json"))
    assert not is_transient_storage_error(caught.value)

    # a checkpoint folder goes up and comes back whole; its manifest is written last
    local = tmp_path / "checkpoint"
    (local / "sub").mkdir(parents=True)
    (local / "model.safetensors").write_bytes(os.urandom(3000))
    (local / "sub" / "tokenizer.json").write_text('{"a": 1}')
    (local / "manifest.json").write_text('{"sha256": "x"}')
    checkpoint = store.checkpoint_uri("demo", 1)
    store.put_dir(local, checkpoint)
    assert store.ls(checkpoint) == sorted(
        store.join(checkpoint, name) for name in ("manifest.json", "model.safetensors", "sub")
    )
    if store.protocol == "file":  # the manifest was written after every other file
        written = {name: os.stat(os.path.join(checkpoint, name)).st_mtime_ns for name in ("manifest.json", "model.safetensors", "sub/tokenizer.json")}
        assert written["manifest.json"] >= max(written.values())
    back = tmp_path / "downloaded"
    store.get_dir(checkpoint, back)
    assert (back / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()
    assert (back / "sub" / "tokenizer.json").read_text() == '{"a": 1}'
    assert (back / "manifest.json").read_text() == '{"sha256": "x"}'
    # put_dir replaces: a file that is gone locally is gone remotely
    (local / "sub" / "tokenizer.json").unlink()
    store.put_dir(local, checkpoint)
    assert not store.exists(store.join(checkpoint, "sub", "tokenizer.json"))
    with pytest.raises(FileNotFoundError):
        store.get_dir(store.join(checkpoint, "nothing-here"), tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()

    sibling = store.join(store.stage_uri("demo", 1, "generate_more"), "x.json")  # shares the prefix
    store.write_json({}, sibling)
    store.rm(uri)
    assert not store.exists(store.join(uri, "table.parquet"))
    assert store.exists(sibling)
    store.rm(uri)  # removing what is gone is not an error
    assert [name for name in os.listdir(back) if ".tmp-" in name] == []


def test_a_file_that_is_not_parquet_is_named_in_the_error(store):
    uri = store.join(store.run_uri("demo"), "broken.parquet")
    store.write_bytes(b"not a parquet file", uri)
    with pytest.raises(ValueError, match=f"{uri} is not a readable Parquet file"):
        store.read_parquet(uri)


def test_local_writes_go_through_a_temporary_name_and_leave_nothing_behind(tmp_path):
    store = Store(StorageConfig(root=str(tmp_path)))
    uri = store.join(store.run_uri("demo"), "table.parquet")
    store.write_parquet(pd.DataFrame({"a": range(10)}), uri)
    assert os.listdir(tmp_path / "demo") == ["table.parquet"]

    class Unserialisable:
        pass

    # serialisation fails before anything is written: neither the target nor a temp file appears
    with pytest.raises(Exception):
        store.write_parquet(pd.DataFrame({"a": [Unserialisable()]}), store.join(store.run_uri("demo"), "bad.parquet"))
    assert os.listdir(tmp_path / "demo") == ["table.parquet"]


_LOOPING_WRITER = """
import sys
from metareward.storage import StorageConfig, Store
store = Store(StorageConfig.model_validate_json(sys.argv[1]))
size = int(sys.argv[2])
versions = [b"\\x01" * size, b"\\x02" * size]
index = 0
while True:
    index += 1
    store.write_bytes(versions[index % 2], sys.argv[3])
"""


def test_a_reader_never_sees_a_partial_file_even_when_the_writer_is_killed(tmp_path):
    """A child process rewrites a 16 MB file in a loop; this process reads it meanwhile, then kills
    the writer (SIGKILL) while one of its temporary files exists, i.e. mid-write."""
    store = Store(StorageConfig(root=str(tmp_path)))
    size = 16 * 2**20
    uri = store.join(store.run_uri("demo"), "blob.bin")
    versions = (b"\x01" * size, b"\x02" * size)
    writer = subprocess.Popen(
        [sys.executable, "-c", _LOOPING_WRITER, store.config.model_dump_json(), str(size), uri],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(uri):
            assert writer.poll() is None, writer.stderr.read().decode()
            assert time.monotonic() < deadline, "the writer never produced its first file"
            time.sleep(0.01)
        reads = 0
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            assert store.read_bytes(uri) in versions
            reads += 1
        assert reads > 3
        killed_mid_write = False
        until = time.monotonic() + 20
        while time.monotonic() < until:
            if any(".blob.bin.tmp-" in name for name in os.listdir(tmp_path / "demo")):
                writer.send_signal(signal.SIGKILL)
                killed_mid_write = True
                break
        assert killed_mid_write, "never caught the writer with a temporary file open"
    finally:
        writer.kill()
        writer.wait(timeout=10)
    assert store.read_bytes(uri) in versions
    # whatever temporary file the killed writer left is hidden from listings
    assert store.ls(store.run_uri("demo")) == [uri]


@pytest.mark.parametrize("server_fixture", ["moto_s3", "rclone_s3"])
def test_s3_readers_see_whole_objects_while_a_writer_overwrites_them(server_fixture, request):
    import threading

    server = request.getfixturevalue(server_fixture)
    store = Store(server.storage_config(prefix=f"atomic-{uuid.uuid4().hex[:8]}"))
    uri = store.join(store.root, "big.bin")
    versions = (b"\x01" * 4_000_000, b"\x02" * 4_000_000)
    store.write_bytes(versions[0], uri)
    stop = threading.Event()
    writes = []

    def overwrite():
        while not stop.is_set():
            store.write_bytes(versions[len(writes) % 2], uri)
            writes.append(1)

    thread = threading.Thread(target=overwrite)
    thread.start()
    try:
        reads = 0
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            assert store.read_bytes(uri) in versions
            reads += 1
    finally:
        stop.set()
        thread.join(timeout=30)
    assert reads > 2 and len(writes) > 2
    assert [name for name in store.ls(store.root) if ".tmp-" in name] == []


# ------------------------------------------------------------------------------------------------
# artifacts and shards


def test_sharded_artifact_resumes_after_the_shards_done_and_finalizes_every_row_once(store):
    uri = store.stage_uri("demo", 1, "judge")
    artifact = ShardedArtifact(store, uri, shard_count=5, info=_info())
    assert artifact.pending_shards() == [0, 1, 2, 3, 4]
    artifact.write_shard(0, _shard_frame(0), seconds=1.5)
    artifact.write_shard(2, _shard_frame(2), seconds=2.5)
    del artifact  # the stage "crashes" here

    reopened = ShardedArtifact(store, uri, shard_count=5, info=_info())
    assert reopened.done_shards() == [0, 2]
    assert reopened.pending_shards() == [1, 3, 4]
    assert not reopened.is_complete()
    with pytest.raises(ValueError, match=r"shards \[1, 3, 4\] are not written yet"):
        reopened.finalize()
    for index in reopened.pending_shards():
        reopened.write_shard(index, _shard_frame(index, rows=0 if index == 3 else 4), seconds=1.0)
    manifest = reopened.finalize(key_columns=["response_id"])

    expected = pd.concat([_shard_frame(i, rows=0 if i == 3 else 4) for i in range(5)], ignore_index=True)
    table = read_artifact(store, uri)
    assert table.to_dict(orient="records") == expected.to_dict(orient="records")
    assert table["response_id"].is_unique
    assert is_complete(store, uri) and reopened.is_complete()
    assert reopened.pending_shards() == []
    assert store.ls(uri) == [store.join(uri, DATA_FILE), store.join(uri, MANIFEST_FILE)]
    assert read_manifest(store, uri) == manifest
    assert manifest["rows"] == 16
    assert manifest["shard_count"] == 5 and manifest["shard_rows"] == [4, 4, 4, 0, 4]
    assert manifest["schema_version"] == 1 and manifest["stage"] == "judge"
    assert manifest["fingerprint"] == "fp-1" and manifest["checkpoint_sha256"] == "ab" * 32
    assert manifest["config"] == {"n": 3, "temperature": 0.8}
    assert manifest["columns"] == {"response_id": str(table["response_id"].dtype), "score": "float64"}
    assert manifest["timings"]["shard_seconds"] == {"0": 1.5, "1": 1.0, "2": 2.5, "3": 1.0, "4": 1.0}
    assert manifest["timings"]["work_seconds"] == pytest.approx(7.0)
    assert manifest["timings"]["wall_seconds"] >= 0
    assert len(manifest["data_sha256"]) == 64

    # opening a complete artifact with the same inputs: nothing to do, finalize is idempotent, and
    # shards left by a finalize killed after its manifest are cleaned up
    store.write_bytes(b"left over", reopened.shard_uri(1))
    again = ShardedArtifact(store, uri, shard_count=5, info=_info())
    assert not store.exists(store.join(uri, "shards"))
    assert again.pending_shards() == [] and again.finalize() == manifest
    with pytest.raises(ValueError, match="already complete"):
        again.write_shard(0, _shard_frame(0))


def test_stale_shards_and_artifacts_from_other_inputs_are_discarded(store):
    uri = store.stage_uri("demo", 1, "generate")
    first = ShardedArtifact(store, uri, shard_count=3, info=_info("old"))
    first.write_shard(0, _shard_frame(0))
    first.write_shard(1, _shard_frame(1))
    # a new checkpoint (another fingerprint) must not reuse the old shards
    second = ShardedArtifact(store, uri, shard_count=3, info=_info("new"))
    assert second.pending_shards() == [0, 1, 2]
    for index in range(3):
        second.write_shard(index, _shard_frame(index))
    second.finalize()
    # another shard count is other inputs too; so is a finished artifact with another fingerprint
    assert ShardedArtifact(store, uri, shard_count=3, info=_info("new")).pending_shards() == []
    assert ShardedArtifact(store, uri, shard_count=4, info=_info("new")).pending_shards() == [0, 1, 2, 3]
    assert not is_complete(store, uri)
    # fresh=True starts over whatever is there
    third = ShardedArtifact(store, uri, shard_count=4, info=_info("new"))
    third.write_shard(0, _shard_frame(0))
    assert ShardedArtifact(store, uri, shard_count=4, info=_info("new"), fresh=True).pending_shards() == [0, 1, 2, 3]


def test_finalize_refuses_duplicate_keys_and_mismatched_columns(tmp_path):
    store = Store(StorageConfig(root=str(tmp_path)))
    uri = store.stage_uri("demo", 1, "judge")
    artifact = ShardedArtifact(store, uri, shard_count=2, info=_info())
    artifact.write_shard(0, _shard_frame(0))
    artifact.write_shard(1, _shard_frame(0))  # the same rows again
    with pytest.raises(ValueError, match=r"4 key\(s\) \['response_id'\] occur on more than one row \(8 rows\)"):
        artifact.finalize(key_columns=["response_id"])
    with pytest.raises(ValueError, match=r"key columns \['judgment_id'\] are not in"):
        artifact.finalize(key_columns=["judgment_id"])
    artifact.write_shard(1, _shard_frame(1).rename(columns={"score": "points"}))
    with pytest.raises(ValueError, match=r"shard-00001.parquet has columns \['response_id', 'points'\]"):
        artifact.finalize()
    assert not is_complete(store, uri)
    with pytest.raises(ValueError, match="outside 0..1"):
        artifact.write_shard(2, _shard_frame(2))
    with pytest.raises(ValueError, match="shard_count must be an integer >= 1"):
        ShardedArtifact(store, uri, shard_count=0, info=_info())


def test_one_piece_artifacts_have_the_same_manifest(store):
    uri = store.stage_uri("demo", 1, "actor_pairs")
    df = pd.DataFrame({"prompt_id": ["a", "b", "c"], "chosen": ["x", "y", "z"]})
    manifest = write_artifact(store, uri, df, _info(stage="actor_pairs"), timings={"select_seconds": 0.25})
    assert is_complete(store, uri)
    pd.testing.assert_frame_equal(read_artifact(store, uri), df)
    assert manifest["rows"] == 3 and manifest["shard_count"] == 1 and manifest["shard_rows"] == [3]
    assert manifest["timings"]["select_seconds"] == 0.25
    assert read_manifest(store, uri) == manifest
    with pytest.raises(FileNotFoundError, match="is not complete"):
        read_artifact(store, store.stage_uri("demo", 1, "judge_pairs"))


_SLOW_SHARD_WRITER = """
import sys, time
import pandas as pd
from metareward.storage import ArtifactInfo, ShardedArtifact, StorageConfig, Store
store = Store(StorageConfig.model_validate_json(sys.argv[1]))
info = ArtifactInfo.model_validate_json(sys.argv[3])
artifact = ShardedArtifact(store, sys.argv[2], shard_count=6, info=info)
for index in artifact.pending_shards():
    frame = pd.DataFrame({"response_id": [f"r{index}-{row}" for row in range(4)], "score": [float(index * 10 + row) for row in range(4)]})
    artifact.write_shard(index, frame, seconds=0.1)
    print(index, flush=True)
    time.sleep(30 if index == 1 else 0)
"""


def test_a_killed_stage_resumes_after_its_committed_shards_on_rclone(rclone_s3):
    """A child process writes shards to the disk-backed S3 server and is killed (SIGKILL) after the
    second one; reopening finds exactly the shards it committed."""
    store = Store(rclone_s3.storage_config(prefix=f"kill-{uuid.uuid4().hex[:8]}"))
    uri = store.stage_uri("demo", 1, "judge")
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOW_SHARD_WRITER, store.config.model_dump_json(), uri, _info().model_dump_json()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        printed = [child.stdout.readline().strip() for _ in range(2)]
        assert printed == ["0", "1"], child.stderr.read()
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=10)
    artifact = ShardedArtifact(store, uri, shard_count=6, info=_info())
    assert artifact.done_shards() == [0, 1]
    assert artifact.pending_shards() == [2, 3, 4, 5]
    for index in artifact.pending_shards():
        artifact.write_shard(index, _shard_frame(index), seconds=0.1)
    manifest = artifact.finalize(key_columns=["response_id"])
    expected = pd.concat([_shard_frame(i) for i in range(6)], ignore_index=True)
    pd.testing.assert_frame_equal(read_artifact(store, uri), expected)
    assert manifest["rows"] == 24


# ------------------------------------------------------------------------------------------------
# failures: transient or not


def test_an_s3_outage_is_transient_and_the_write_goes_through_after_recovery(rclone_s3):
    store = Store(rclone_s3.storage_config(prefix=f"outage-{uuid.uuid4().hex[:8]}"))
    before = store.join(store.root, "before.json")
    during = store.join(store.root, "during.parquet")
    store.write_json({"kept": True}, before)
    rclone_s3.stop()
    try:
        for attempt in (
            lambda: store.write_parquet(pd.DataFrame({"a": [1]}), during),
            lambda: store.read_json(before),
            lambda: store.exists(before),
            lambda: store.ls(store.root),
        ):
            started = time.monotonic()
            with pytest.raises(TransientStorageError) as caught:
                attempt()
            assert is_transient_storage_error(caught.value)
            assert store.root in str(caught.value)
            assert time.monotonic() - started < 30
    finally:
        rclone_s3.start()
    assert store.read_json(before) == {"kept": True}  # the data on disk survived the outage
    assert not store.exists(during)  # the failed write left nothing under its name
    store.write_parquet(pd.DataFrame({"a": [1]}), during)
    assert store.read_parquet(during)["a"].tolist() == [1]


def test_bad_credentials_fail_at_once_with_the_uri_and_without_the_secret(rclone_s3, monkeypatch, caplog):
    monkeypatch.setenv("MR_WRONG_SECRET", "definitely-not-the-secret-" + uuid.uuid4().hex)
    config = rclone_s3.storage_config(secret_access_key_env="MR_WRONG_SECRET")
    store = Store(config)
    uri = store.join(store.root, "anything.json")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PermissionError) as caught:
        store.read_json(uri)
    assert uri in str(caught.value)
    assert not is_transient_storage_error(caught.value)
    for secret in (os.environ["MR_WRONG_SECRET"], rclone_s3.secret):
        assert secret not in str(caught.value)
        assert secret not in caplog.text


def test_missing_bucket_is_not_transient(moto_s3):
    store = Store(moto_s3.storage_config(bucket="no-such-bucket-here"))
    with pytest.raises(FileNotFoundError) as caught:
        store.read_bytes(store.join(store.root, "x.json"))
    assert "s3://no-such-bucket-here/x.json" in str(caught.value)
    assert not is_transient_storage_error(caught.value)


def test_credentials_never_appear_in_repr_pickle_or_logs(moto_s3, caplog):
    config = moto_s3.storage_config(prefix="secrets")
    store = Store(config)
    caplog.set_level(logging.DEBUG)
    store.write_json({"x": 1}, store.join(store.root, "a.json"))
    assert store.read_json(store.join(store.root, "a.json")) == {"x": 1}
    store.ls(store.root)
    shown = " ".join([repr(store), str(store), repr(config), config.model_dump_json(), caplog.text])
    assert moto_s3.secret not in shown
    assert moto_s3.endpoint_url in repr(store)
    pickled = pickle.dumps(store)
    assert moto_s3.secret.encode() not in pickled
    # the unpickled store reads the credentials from the environment again
    assert pickle.loads(pickled).read_json(store.join(store.root, "a.json")) == {"x": 1}


def test_endpoint_from_the_environment(moto_s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint_url)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_s3.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_s3.secret)
    store = Store(StorageConfig(root=f"s3://{moto_s3.bucket}/from-env"))
    assert moto_s3.endpoint_url in repr(store)
    store.write_json([1, 2], store.join(store.root, "list.json"))
    assert moto_s3.fs().cat_file(f"{moto_s3.bucket}/from-env/list.json") == b"[\n  1,\n  2\n]\n"
    regional = Store(StorageConfig(root=f"s3://{moto_s3.bucket}/regional", region="eu-west-1"))
    regional.write_json({"region": "eu-west-1"}, regional.join(regional.root, "r.json"))
    assert regional.read_json(regional.join(regional.root, "r.json")) == {"region": "eu-west-1"}


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


def test_transient_classification_of_exception_types():
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError
    from fsspec.exceptions import FSTimeoutError
    from s3fs.errors import translate_boto_error

    transient = [
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
        _client_error("SlowDown", 503),
        _client_error("Throttling", 400),
        _client_error("InternalError", 500),
        _client_error("SomethingNew", 502),
        _client_error("TooManyRequests", 429),
        translate_boto_error(_client_error("SlowDown", 503)),
        translate_boto_error(_client_error("SomethingNew", 504)),
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
        ConnectionResetError(errno.ECONNRESET, "reset"),
        TimeoutError("timed out"),
        FSTimeoutError(),
        OSError(errno.ETIMEDOUT, "timed out"),
        TransientStorageError("cannot write x"),
    ]
    permanent = [
        FileNotFoundError("nope"),
        PermissionError("denied"),
        _client_error("AccessDenied", 403),
        _client_error("InvalidAccessKeyId", 403),
        _client_error("NoSuchKey", 404),
        translate_boto_error(_client_error("AccessDenied", 403)),
        translate_boto_error(_client_error("SignatureDoesNotMatch", 403)),
        NoCredentialsError(),
        StorageError("cannot write x: bad request"),
        ValueError("not storage at all"),
        OSError(errno.EINVAL, "invalid"),
    ]
    assert [is_transient_storage_error(exc) for exc in transient] == [True] * len(transient)
    assert [is_transient_storage_error(exc) for exc in permanent] == [False] * len(permanent)
    # a wrapper is judged by what it wraps
    try:
        try:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        except ConnectionResetError as inner:
            raise RuntimeError("upload failed") from inner
    except RuntimeError as wrapped:
        assert is_transient_storage_error(wrapped)


def test_manifest_is_valid_json_written_after_the_data(tmp_path):
    """The manifest is the completeness marker: it names the data's sha256, which matches the file."""
    import hashlib

    store = Store(StorageConfig(root=str(tmp_path)))
    uri = store.stage_uri("demo", 1, "scores")
    manifest = write_artifact(store, uri, pd.DataFrame({"a": [1, 2]}), _info(stage="scores"))
    data = (tmp_path / "demo" / "iter-1" / "scores" / DATA_FILE).read_bytes()
    assert hashlib.sha256(data).hexdigest() == manifest["data_sha256"]
    on_disk = json.loads((tmp_path / "demo" / "iter-1" / "scores" / MANIFEST_FILE).read_text())
    assert on_disk == manifest
    assert (tmp_path / "demo" / "iter-1" / "scores" / MANIFEST_FILE).stat().st_mtime_ns >= (
        tmp_path / "demo" / "iter-1" / "scores" / DATA_FILE
    ).stat().st_mtime_ns
