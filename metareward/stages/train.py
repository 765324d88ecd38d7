"""The last stages of an iteration: DPO on the iteration's pairs (M_{i-1} -> M_i), and the
iteration's summary."""

from __future__ import annotations

import json
import logging
from typing import Sequence

import pandas as pd

from metareward import contract
from metareward.checkpoints import ModelRef
from metareward.contract import SummarySettings, TrainSettings
from metareward.execution import RayExecutionConfig
from metareward.schema import KIND, KIND_ACTOR, KIND_JUDGE, PAIRS_COLUMNS, STATUS_FORCED
from metareward.stages.common import ProgressCallback, artifact_uri, checkpoint_fs, read_tables, report_progress, stage_info
from metareward.stages.results import ACTOR_PAIRS, ADAPTER, JUDGE_PAIRS, SUMMARY, TRAIN, TRAIN_STATE, StageResult, SummaryResult, TrainResult
from metareward.storage import Store, is_complete, read_artifact, read_manifest, write_artifact
from metareward.summaries import IterationSummary, StageSummaries, StageSummary, TrainSummary

logger = logging.getLogger(__name__)


def train(
    store: Store,
    run: str,
    settings: TrainSettings,
    model: ModelRef,
    actor_pairs_uri: str,
    judge_pairs_uri: str | None = None,
    progress: ProgressCallback | None = None,
    ray: RayExecutionConfig | None = None,
) -> TrainResult:
    """DPO on the union of the iteration's actor pairs and judge pairs (`judge_pairs_uri` None when
    the iteration trains none), reference = `model` (M_{i-1}); M_i is saved at
    `store.checkpoint_uri(run, i)` and returned in `summary.model`, the training metrics in the
    `train` artifact. Judge pairs are mixed in by `training.max_judge_pairs` / `judge_pairs_ratio`
    (counts in `summary.mixing`). With LoRA the adapter is saved at `{iteration}/adapter`
    (`summary.adapter`); with `training.save_steps` trainer checkpoints go to
    `{iteration}/train_state` and a re-run after a kill resumes from the newest
    (`summary.resumed_from_step`); the state is removed once M_i is saved. With
    `training.launcher: ray_train` the DPO workers run on the Ray cluster `ray`. With no pairs at
    all, or none left after the training input rules (`metareward.training`), nothing is trained:
    `summary.model` is None and `summary.message` says why; the caller stops the run there."""
    iteration = settings.iteration
    upstream = {ACTOR_PAIRS: actor_pairs_uri} | ({JUDGE_PAIRS: judge_pairs_uri} if judge_pairs_uri else {})
    tables = read_tables(store, upstream)
    union = pd.concat([tables[name] for name in upstream], ignore_index=True)
    by_kind = {kind: int((union[KIND] == kind).sum()) for kind in (KIND_ACTOR, KIND_JUDGE)}
    if union.empty:
        message = (
            f"iteration {iteration} has no preference pairs (actor: 0, judge: "
            f"{'0' if judge_pairs_uri else 'not trained'}), so there is nothing to train M{iteration} on; "
            "the run stops here. The actor_pairs and judge_pairs summaries say why each prompt gave no pair."
        )
        logger.warning(message)
        report_progress(progress, 1, 1)
        summary = TrainSummary(trained=False, pairs=0, pairs_by_kind=by_kind, message=message)
        return TrainResult(stage="train", uri=None, summary=summary)

    from metareward.engines import release_engines
    from metareward.training import NoTrainablePairs, train_dpo

    report_progress(progress, 0, 1)
    # DPO holds the policy, the reference and the optimizer: the serving copy must go first.
    release_engines()
    try:
        result = train_dpo(
            union[list(PAIRS_COLUMNS)],
            base=model,
            output_uri=store.checkpoint_uri(run, iteration),
            config=settings.training,
            fs=checkpoint_fs(store),
            adapter_uri=artifact_uri(store, run, settings, ADAPTER),
            state_uri=artifact_uri(store, run, settings, TRAIN_STATE),
            ray=ray,
        )
    except NoTrainablePairs as error:
        message = (
            f"iteration {iteration} has {len(union)} preference pairs but the training input rules "
            f"dropped every one (by reason: {error.dropped}; see training.max_length and training.long_pairs), "
            f"so there is nothing to train M{iteration} on; the run stops here."
        )
        logger.warning(message)
        report_progress(progress, 1, 1)
        summary = TrainSummary(trained=False, pairs=len(union), pairs_by_kind=by_kind, dropped=error.dropped, message=message)
        return TrainResult(stage="train", uri=None, summary=summary)
    uri = artifact_uri(store, run, settings, TRAIN)
    manifest = write_artifact(store, uri, result.metrics, stage_info(store, contract.TRAIN, settings, model, upstream))
    report_progress(progress, 1, 1)
    last = result.metrics.iloc[-1].to_dict() if len(result.metrics) else {}
    summary = TrainSummary(
        trained=True,
        pairs=len(union),
        pairs_by_kind=by_kind,
        pairs_used=result.n_pairs_used,
        pairs_used_by_kind=dict(result.n_pairs_used_by_kind),
        dropped=dict(result.n_pairs_dropped),
        truncated=result.n_pairs_truncated,
        mixing=dict(result.mixing),
        steps=result.n_steps,
        resumed_from_step=result.resumed_from_step,
        processes=result.num_processes,
        precision=result.precision,
        train_seconds=result.train_seconds,
        final_loss=float(last["loss"]) if "loss" in last else None,
        model=result.model,
        adapter=result.adapter,
    )
    return TrainResult(stage="train", uri=uri, uris={TRAIN: uri}, key=manifest["fingerprint"], summary=summary)


def summary_keys(results: Sequence[StageResult]) -> dict[str, str]:
    """The summary's upstream keys: every stage result's fingerprint by stage ("" for a train stage
    that trained nothing, whose message the summary still holds)."""
    return {result.stage: result.key for result in results}


def summary(store: Store, run: str, settings: SummarySettings, model: ModelRef, results: Sequence[StageResult]) -> SummaryResult:
    """The iteration at a glance: one row per stage (stage, artifact URI, rows, work seconds, the
    stage's summary as JSON) in `summary`, closed by the summary's own row: the `IterationSummary`
    with M_{i-1} and M_i as typed fields (what `read_stored_iteration` reads back)."""
    by_stage = StageSummaries.model_validate({result.stage: result.summary for result in results})
    judge, meta_judge, trained = by_stage.judge, by_stage.meta_judge, by_stage.train
    overview = IterationSummary(
        iteration=settings.iteration,
        base=model,
        model=trained.model if trained is not None else None,
        prompts=by_stage.sample_prompts.prompts if by_stage.sample_prompts else None,
        responses=by_stage.generate.responses if by_stage.generate else None,
        duplicates_removed=by_stage.generate.dropped.get("duplicate_text") if by_stage.generate else None,
        judgments=judge.judgments if judge else None,
        judgments_forced=judge.statuses.get(STATUS_FORCED) if judge else None,
        mean_score=judge.mean_score if judge else None,
        meta_judgments=meta_judge.meta_judgments if meta_judge else None,
        meta_judgments_forced=meta_judge.statuses.get(STATUS_FORCED) if meta_judge else None,
        actor_pairs=by_stage.actor_pairs.pairs if by_stage.actor_pairs else None,
        judge_pairs=by_stage.judge_pairs.pairs if by_stage.judge_pairs else None,
        trained=bool(trained and trained.trained),
        final_loss=trained.final_loss if trained else None,
    )
    rows = []
    for result in results:
        rows_written, seconds = None, None
        if result.uri is not None:
            manifest = read_manifest(store, result.uri)
            rows_written = int(manifest["rows"])
            timings = manifest.get("timings", {})
            seconds = timings.get("work_seconds", timings.get("write_seconds"))
        rows.append({"stage": result.stage, "uri": result.uri or "", "rows": rows_written, "seconds": seconds, "summary": _json(result.summary)})
    uri = artifact_uri(store, run, settings, SUMMARY)
    rows.append({"stage": SUMMARY, "uri": uri, "rows": None, "seconds": None, "summary": _json(overview)})
    table = pd.DataFrame(rows, columns=["stage", "uri", "rows", "seconds", "summary"]).astype({"rows": "Int64", "seconds": "float64"})
    upstream = {result.stage: result.uri for result in results if result.uri is not None}
    info = stage_info(store, contract.SUMMARY, settings, model, upstream, keys=summary_keys(results))
    manifest = write_artifact(store, uri, table, info)
    return SummaryResult(stage=SUMMARY, uri=uri, uris={SUMMARY: uri}, key=manifest["fingerprint"], summary=overview)


def _json(summary: StageSummary) -> str:
    """A summary as stored: JSON without the fields that do not apply (None), as diagnostics read it."""
    return json.dumps(summary.model_dump(mode="json", exclude_none=True), sort_keys=True)


def stored_summary(store: Store, run: str, iteration: int) -> SummaryResult | None:
    """The `summary` stage's result of a stored iteration (None when it has none): what the next
    iteration's checks read the previous iteration through."""
    uri = store.stage_uri(run, iteration, SUMMARY)
    if not is_complete(store, uri):
        return None
    overview = read_summaries(read_artifact(store, uri)).summary
    return SummaryResult(stage=SUMMARY, uri=uri, uris={SUMMARY: uri}, key=read_manifest(store, uri)["fingerprint"], summary=overview)


def read_summaries(table: pd.DataFrame) -> StageSummaries:
    """The typed summaries of a stored `summary` table (its last row: the iteration's own)."""
    return StageSummaries.model_validate({str(stage): json.loads(text) for stage, text in zip(table["stage"], table["summary"])})
