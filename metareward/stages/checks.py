"""The checks before training: what the judge and meta-judge produced, held to the declared
thresholds (`metareward.checks`) before DPO trains on it. One table, one row per check."""

from __future__ import annotations

from metareward import contract
from metareward.checks import CheckStatus, results_table, run_checks
from metareward.contract import PreTrainChecksSettings
from metareward.diagnostics import IterationTables, iteration_metrics
from metareward.stages.common import artifact_uri, read_tables, stage_info
from metareward.stages.results import (
    ACTOR_PAIRS,
    JUDGE_PAIRS,
    JUDGMENTS,
    META_JUDGMENTS,
    PRE_TRAIN_CHECKS,
    RESPONSES,
    ChecksResult,
)
from metareward.storage import Store, write_artifact
from metareward.summaries import ChecksSummary


def pre_train_checks(
    store: Store,
    run: str,
    settings: PreTrainChecksSettings,
    responses_uri: str,
    judgments_uri: str,
    actor_pairs_uri: str,
    meta_judgments_uri: str | None = None,
    judge_pairs_uri: str | None = None,
    previous_summary_uri: str | None = None,
) -> ChecksResult:
    """Every pre-train check on the iteration's tables (and the previous iteration's responses and
    judgments, for the changes against it, when `previous_summary_uri` is given). Writes
    `pre_train_checks`."""
    upstream = {"responses": responses_uri, "judgments": judgments_uri, "actor_pairs": actor_pairs_uri}
    if meta_judgments_uri is not None:
        upstream["meta_judgments"] = meta_judgments_uri
    if judge_pairs_uri is not None:
        upstream["judge_pairs"] = judge_pairs_uri
    if previous_summary_uri is not None:
        upstream["previous"] = previous_summary_uri
    info = stage_info(store, contract.PRE_TRAIN_CHECKS, settings, None, upstream)
    uris = {RESPONSES: responses_uri, JUDGMENTS: judgments_uri, ACTOR_PAIRS: actor_pairs_uri}
    uris |= {name: uri for name, uri in ((META_JUDGMENTS, meta_judgments_uri), (JUDGE_PAIRS, judge_pairs_uri)) if uri}
    tables = read_tables(store, uris)
    row = iteration_metrics(IterationTables(iteration=settings.iteration, **tables)).iloc[0].to_dict()
    previous = None
    if previous_summary_uri is not None:
        earlier = settings.iteration - 1
        previous_tables = read_tables(
            store, {name: store.stage_uri(run, earlier, name) for name in (RESPONSES, JUDGMENTS)}
        )
        previous = iteration_metrics(IterationTables(iteration=earlier, **previous_tables)).iloc[0].to_dict()
    results = run_checks("pre_train", settings.checks.thresholds, row, previous)
    uri = artifact_uri(store, run, settings, PRE_TRAIN_CHECKS)
    manifest = write_artifact(store, uri, results_table(results), info)

    def named(status: CheckStatus) -> list[str]:
        return [result.check for result in results if result.status == status]

    summary = ChecksSummary(
        gate="pre_train", passed=not named("fail"), failed=named("fail"), warned=named("warn"), skipped=named("skipped"),
        checks=len(results),
    )
    return ChecksResult(stage=PRE_TRAIN_CHECKS, uri=uri, uris={PRE_TRAIN_CHECKS: uri}, key=manifest["fingerprint"], summary=summary)
