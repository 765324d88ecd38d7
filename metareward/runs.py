"""What storage holds of a run: its iterations (`read_history`), where it resumes and what a given
iteration starts from, which pipeline version wrote it, and the refusal to continue one written by
another.

Every manifest records `pipeline_version` (`metareward.contract.PIPELINE_VERSION`; manifests written
before it was recorded are pipeline version 1). A run stored by another version is never continued
silently: its fingerprints no longer match, so every stage would run again and overwrite
`iter-{i}/model`. `metareward run` refuses it (exit 2) naming both versions; `--refresh` retrains it
with the current code; `status`, `show` and `report` read it as it is.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from metareward import contract
from metareward.checkpoints import MANIFEST_NAME, ModelRef
from metareward.gates import read_promotion
from metareward.stages import PROMPTS, SUMMARY, read_summaries
from metareward.storage import Store, is_complete, read_artifact, read_manifest
from metareward.summaries import StageSummaries

# What manifests that predate the `pipeline_version` field were written by.
FIRST_PIPELINE_VERSION = "metareward-pipeline-1"


class StoredRunVersionError(ValueError):
    """A run in storage was written by another pipeline version than this code's."""


def stored_pipeline_versions(store: Store, run: str) -> dict[int, str]:
    """The pipeline version of each stored iteration of `run`, read from its prompts' manifest."""
    versions = {}
    for iteration in store.list_iterations(run):
        uri = store.stage_uri(run, iteration, PROMPTS)
        if is_complete(store, uri):
            versions[iteration] = read_manifest(store, uri).get("pipeline_version") or FIRST_PIPELINE_VERSION
    return versions


def check_stored_version(store: Store, run: str) -> None:
    """Refuse to continue a run whose stored iterations another pipeline version wrote."""
    other = {iteration: version for iteration, version in stored_pipeline_versions(store, run).items() if version != contract.PIPELINE_VERSION}
    if other:
        listed = ", ".join(f"iteration {iteration}: {version}" for iteration, version in sorted(other.items()))
        raise StoredRunVersionError(
            f"run {run} in {store.root} was stored by another pipeline version ({listed}); this code is "
            f"{contract.PIPELINE_VERSION}. Continuing would recompute every stage and overwrite its checkpoints: "
            "run with --refresh to train it again from M0 with this version, or use another run name"
        )


class IterationRecord(BaseModel):
    """What storage holds of one iteration.

    complete: its summary artifact and its promotion record exist (a gate still waiting, or one
    that timed out, leaves it incomplete). trained: it produced a checkpoint (`model`, M_i) from
    `base`. promoted: M_i became the next iteration's base (`promotion_reason` says why or why
    not). pruned: that checkpoint is no longer in storage (removed by `keep_last_checkpoints`, or by
    hand). stages: every stage's typed summary from the summary artifact (the pre-train checks
    among them). artifacts: the names of the artifacts present and complete under `iter-{i}/`.
    """

    model_config = ConfigDict(extra="forbid")

    iteration: int
    complete: bool
    trained: bool = False
    base: ModelRef | None = None
    model: ModelRef | None = None
    promoted: bool = False
    promotion_reason: str | None = None
    pruned: bool = False
    message: str | None = None
    stages: StageSummaries = Field(default_factory=StageSummaries)
    artifacts: list[str] = Field(default_factory=list)


def read_history(store: Store, run: str) -> list[IterationRecord]:
    """Every iteration folder of `run` in `store`, ascending, with what it holds."""
    records = []
    for iteration in store.list_iterations(run):
        folder = store.iteration_uri(run, iteration)
        artifacts = [
            uri.rsplit("/", 1)[-1] for uri in store.ls(folder) if is_complete(store, uri)
        ]
        summary_uri = store.stage_uri(run, iteration, SUMMARY)
        if not is_complete(store, summary_uri):
            records.append(IterationRecord(iteration=iteration, complete=False, artifacts=artifacts))
            continue
        stages = read_summaries(read_artifact(store, summary_uri))
        trained = stages.train
        model = trained.model if trained is not None else None
        promotion = read_promotion(store, run, iteration)
        records.append(
            IterationRecord(
                iteration=iteration,
                complete=promotion is not None,
                trained=model is not None,
                promoted=promotion is not None and promotion.promoted,
                promotion_reason=promotion.reason if promotion is not None else None,
                base=stages.summary.base if stages.summary is not None else None,  # None: stored by pipeline 2
                model=model,
                pruned=model is not None and not store.exists(store.join(model.uri, MANIFEST_NAME)),
                message=trained.message if trained is not None else None,
                stages=stages,
                artifacts=artifacts,
            )
        )
    return records


def promoted_base(done: list[IterationRecord]) -> IterationRecord | None:
    """The last iteration of `done` whose M_i was promoted: its M_i is the next iteration's base
    (None: M0)."""
    promoted = [record for record in done if record.trained and record.promoted]
    return promoted[-1] if promoted else None


def trailing_rejections(done: list[IterationRecord]) -> int:
    """How many iterations at the end of `done` in a row trained an M_i that was not promoted."""
    count = 0
    for record in reversed(done):
        if not record.trained or record.promoted:
            break
        count += 1
    return count


def completed_prefix(history: list[IterationRecord]) -> list[IterationRecord]:
    """The complete iterations 1, 2, ... without a gap, up to the first that trained no model
    (what a run resumes after)."""
    done = []
    for expected, record in enumerate(history, start=1):
        if record.iteration != expected or not record.complete:
            break
        done.append(record)
        if not record.trained:
            break
    return done


class UnavailableBase(ValueError):
    """Iteration I cannot start: the checkpoint it starts from is not in storage."""


def base_of_iteration(history: list[IterationRecord], iteration: int, run: str) -> ModelRef | None:
    """The checkpoint iteration `iteration` starts from: the M_i of the last promoted iteration
    among the complete, trained iterations before it (M_{I-1} when it was promoted); None when
    none was promoted (M0, which the caller resolves). Refused, naming why, when the iterations
    before it are not all complete and trained, or that checkpoint has been pruned."""
    if iteration == 1:
        return None
    done = completed_prefix(history)
    if len(done) < iteration - 1 or not done[iteration - 2].trained:
        trained = sum(record.trained for record in done)
        raise UnavailableBase(
            f"iteration {iteration} starts after iteration {iteration - 1}, but run {run} has {trained} complete trained "
            "iteration(s) in a row from iteration 1"
        )
    base = promoted_base(done[: iteration - 1])
    if base is None:
        return None
    if base.pruned:
        raise UnavailableBase(
            f"iteration {iteration} starts from M{base.iteration} (the last promoted checkpoint), which was pruned "
            "(keep_last_checkpoints); `metareward run --refresh` trains the run again from M0"
        )
    return base.model
