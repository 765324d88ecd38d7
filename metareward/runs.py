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

    complete: its summary artifact exists. trained: it produced a checkpoint (`model`, M_i) from
    `base` (M_{i-1}). pruned: that checkpoint is no longer in storage (removed by
    `keep_last_checkpoints`, or by hand). stages: every stage's typed summary from the summary
    artifact. artifacts: the names of the artifacts present and complete under `iter-{i}/`.
    """

    model_config = ConfigDict(extra="forbid")

    iteration: int
    complete: bool
    trained: bool = False
    base: ModelRef | None = None
    model: ModelRef | None = None
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
        records.append(
            IterationRecord(
                iteration=iteration,
                complete=True,
                trained=model is not None,
                base=stages.summary.base if stages.summary is not None else None,  # None: stored by pipeline 2
                model=model,
                pruned=model is not None and not store.exists(store.join(model.uri, MANIFEST_NAME)),
                message=trained.message if trained is not None else None,
                stages=stages,
                artifacts=artifacts,
            )
        )
    return records


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
    """The checkpoint iteration `iteration` starts from: M_{I-1} of the complete, trained
    iterations before it; None for iteration 1 (M0, which the caller resolves). Refused, naming
    why, when that checkpoint was never trained or has been pruned."""
    if iteration == 1:
        return None
    done = completed_prefix(history)
    if len(done) < iteration - 1 or not done[iteration - 2].trained:
        trained = sum(record.trained for record in done)
        raise UnavailableBase(
            f"iteration {iteration} starts from M{iteration - 1}, but run {run} has {trained} trained iteration(s) "
            f"in a row from iteration 1"
        )
    base = done[iteration - 2]
    if base.pruned:
        raise UnavailableBase(
            f"iteration {iteration} starts from M{iteration - 1}, whose checkpoint was pruned (keep_last_checkpoints); "
            "`metareward run --refresh` trains the run again from M0"
        )
    return base.model
