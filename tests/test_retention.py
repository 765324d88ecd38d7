"""Checkpoint retention: `prune_checkpoints` over a real store (local folder, moto S3), what
`read_history` shows afterwards, and that a run still resumes from its newest checkpoint.

The checkpoints are small stand-in folders (a config and a few safetensors bytes with a real
manifest): retention only lists, checks and removes folders, so no model is needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.run import prune_checkpoints_task
from metareward.runs import completed_prefix, read_history
from metareward.checkpoints import MANIFEST_NAME, CheckpointError, ModelRef, materialize, prune_checkpoints, ref_from_folder
from metareward.config import RunConfig, load_config
from metareward.gates import PromotionRecord, write_promotion
from metareward.stages import TrainResult
from metareward.summaries import TrainSummary
from tests.fixtures import stage_calls
from metareward.storage import StorageConfig, Store

RUN = "keep"


def _write_checkpoint(folder: Path, iteration: int) -> ModelRef:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(f'{{"iteration": {iteration}}}\n')
    (folder / "model.safetensors").write_bytes(bytes([iteration]) * 64)
    return ref_from_folder(folder)


def _local_run(tmp_path: Path, iterations: int) -> tuple[Store, list[ModelRef]]:
    store = Store(StorageConfig(root=str(tmp_path / "runs")))
    refs = [_write_checkpoint(Path(store.checkpoint_uri(RUN, i)), i) for i in range(1, iterations + 1)]
    for i in range(1, iterations + 1):  # another artifact of each iteration, which retention must leave alone
        store.write_json({"iteration": i}, store.join(store.stage_uri(RUN, i, "train"), "note.json"))
    return store, refs


def _present(store: Store, iteration: int) -> bool:
    return store.exists(store.checkpoint_uri(RUN, iteration))


def test_keeps_the_newest_n_and_removes_the_older_ones(tmp_path):
    store, refs = _local_run(tmp_path, 4)
    retention = prune_checkpoints(store, RUN, keep_last=2, newest=4)
    assert retention.keep_last == 2
    assert retention.kept == [store.checkpoint_uri(RUN, 3), store.checkpoint_uri(RUN, 4)]
    assert retention.pruned == [store.checkpoint_uri(RUN, 1), store.checkpoint_uri(RUN, 2)]
    assert [_present(store, i) for i in (1, 2, 3, 4)] == [False, False, True, True]
    # The kept ones still verify; the iterations' other artifacts are all still there.
    assert materialize(refs[3]) == Path(refs[3].uri)
    assert all(store.exists(store.join(store.stage_uri(RUN, i, "train"), "note.json")) for i in (1, 2, 3, 4))
    # Pruning again removes nothing more.
    assert prune_checkpoints(store, RUN, keep_last=2, newest=4).pruned == []


def test_a_pruned_checkpoints_lora_adapter_goes_with_it(tmp_path):
    store, _ = _local_run(tmp_path, 3)
    for i in (1, 2, 3):
        _write_checkpoint(Path(store.stage_uri(RUN, i, "adapter")), i)
    prune_checkpoints(store, RUN, keep_last=2, newest=3)
    assert [store.exists(store.stage_uri(RUN, i, "adapter")) for i in (1, 2, 3)] == [False, True, True]


@pytest.mark.parametrize("keep_last", [None, 0])
def test_zero_or_null_keeps_every_checkpoint(tmp_path, keep_last):
    store, _ = _local_run(tmp_path, 3)
    retention = prune_checkpoints(store, RUN, keep_last=keep_last, newest=3)
    assert retention.keep_last is None and retention.kept == [] and retention.pruned == []
    assert all(_present(store, i) for i in (1, 2, 3))


def test_the_checkpoint_the_next_iteration_needs_is_never_removed(tmp_path):
    store, _ = _local_run(tmp_path, 4)
    # Checkpoints after `newest` (left from before a refresh) are not touched, and keep_last counts
    # from `newest` down: after re-training iteration 1, M1 stays although M2-M4 are newer.
    retention = prune_checkpoints(store, RUN, keep_last=1, newest=1)
    assert retention.kept == [store.checkpoint_uri(RUN, 1)] and retention.pruned == []
    assert all(_present(store, i) for i in (1, 2, 3, 4))
    retention = prune_checkpoints(store, RUN, keep_last=1, newest=3)
    assert retention.pruned == [store.checkpoint_uri(RUN, 1), store.checkpoint_uri(RUN, 2)]
    assert [_present(store, i) for i in (1, 2, 3, 4)] == [False, False, True, True]


def test_a_missing_newest_checkpoint_is_an_error_and_nothing_is_removed(tmp_path):
    store, _ = _local_run(tmp_path, 2)
    with pytest.raises(CheckpointError, match=r"iter-3/model: not there.*iteration 4 starts from"):
        prune_checkpoints(store, RUN, keep_last=1, newest=3)
    assert _present(store, 1) and _present(store, 2)


def test_old_leftovers_without_a_manifest_go_and_do_not_count_as_kept(tmp_path):
    store, _ = _local_run(tmp_path, 3)
    (Path(store.checkpoint_uri(RUN, 1)) / MANIFEST_NAME).unlink()  # a failed upload's remains
    (Path(store.checkpoint_uri(RUN, 2)) / MANIFEST_NAME).unlink()
    retention = prune_checkpoints(store, RUN, keep_last=2, newest=3)
    # Only M3 is a checkpoint: it is kept; both incomplete folders before it are removed.
    assert retention.kept == [store.checkpoint_uri(RUN, 3)]
    assert retention.pruned == [store.checkpoint_uri(RUN, 1), store.checkpoint_uri(RUN, 2)]


def test_prunes_on_s3(moto_s3, tmp_path):
    store = Store(moto_s3.storage_config(prefix=f"retention-{tmp_path.name}"))
    for i in (1, 2, 3):
        local = tmp_path / f"m{i}"
        _write_checkpoint(local, i)
        store.put_dir(local, store.checkpoint_uri(RUN, i), last=(MANIFEST_NAME,))
    retention = prune_checkpoints(store, RUN, keep_last=1, newest=3)
    assert retention.pruned == [store.checkpoint_uri(RUN, 1), store.checkpoint_uri(RUN, 2)]
    assert [_present(store, i) for i in (1, 2, 3)] == [False, False, True]
    assert store.exists(store.join(store.checkpoint_uri(RUN, 3), MANIFEST_NAME))


def _write_summaries(store: Store, seed: ModelRef, refs: list[ModelRef]) -> None:
    """Each iteration's summary artifact, written by the real summary stage from a train result,
    then its promotion record (M_i promoted, as without the evaluation's gate): complete iterations."""
    config = RunConfig(name=RUN, storage=store.config)
    base = seed
    for iteration, ref in enumerate(refs, start=1):
        trained = TrainResult(stage="train", uri=None, summary=TrainSummary(trained=True, pairs=2, model=ref))
        stage_calls.summary(store, config.for_iteration(iteration), base, [trained])
        write_promotion(store, RUN, PromotionRecord(iteration=iteration, base=base, model=ref, promoted=True, reason="no gate"))
        base = ref


def test_history_shows_pruned_checkpoints_and_the_run_resumes_from_the_newest(tmp_path):
    store, refs = _local_run(tmp_path, 4)
    seed = _write_checkpoint(tmp_path / "seed", 0)
    _write_summaries(store, seed, refs)
    prune_checkpoints(store, RUN, keep_last=2, newest=4)

    history = read_history(store, RUN)
    assert [(record.iteration, record.trained, record.pruned) for record in history] == [
        (1, True, True),
        (2, True, True),
        (3, True, False),
        (4, True, False),
    ]
    # The pruned iterations keep their checkpoint's identity (for the record) and all else.
    assert history[0].model == refs[0] and "summary" in history[0].artifacts
    # Resuming (flows.run): after the complete prefix, from the last trained iteration's checkpoint,
    # which is present and verifies.
    done = completed_prefix(history)
    assert len(done) == 4
    newest = [record for record in done if record.trained][-1].model
    assert newest == refs[3]
    assert materialize(newest) == Path(refs[3].uri)
    assert Path(seed.uri, MANIFEST_NAME).is_file()  # M0 was never in the run's folder


def test_evaluating_against_a_pruned_checkpoint_says_what_to_change(tmp_path):
    from flows.evaluate import resolve_models

    store, refs = _local_run(tmp_path, 3)
    seed = _write_checkpoint(tmp_path / "seed", 0)
    _write_summaries(store, seed, refs)
    prune_checkpoints(store, RUN, keep_last=2, newest=3)
    config = RunConfig(name=RUN, model=seed.uri, storage=StorageConfig(root=str(tmp_path / "runs")))
    assert resolve_models.fn(config, 3, None, None).model_y.sha256 == refs[1].sha256  # M_2 is kept
    with pytest.raises(ValueError, match="iteration 1 .* was pruned .*keep_last_checkpoints"):
        resolve_models.fn(config, 2, None, None)


def test_the_default_keeps_two_and_the_paper_config_keeps_the_default():
    assert RunConfig(name="x").keep_last_checkpoints == 2
    paper = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper-llama3-8b.yaml")
    assert paper.keep_last_checkpoints == 2


def test_the_prune_task_runs_through_prefect(prefect_api, tmp_path):
    from prefect import flow

    @flow(name="prune-test")
    def prune_flow(storage: StorageConfig):
        return prune_checkpoints_task(storage, RUN, 1, 3)

    store, _ = _local_run(tmp_path, 3)
    retention = prune_flow(store.config)
    assert retention.pruned == [store.checkpoint_uri(RUN, 1), store.checkpoint_uri(RUN, 2)]
    assert _present(store, 3)
