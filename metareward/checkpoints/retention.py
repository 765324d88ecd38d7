"""Checkpoint retention: `prune_checkpoints` keeps the newest `keep_last` checkpoints of a run."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

from pydantic import BaseModel, ConfigDict, Field

from metareward.checkpoints.ref import ADAPTER_NAME, MANIFEST_NAME, CheckpointError

if TYPE_CHECKING:
    from metareward.storage import Store

logger = logging.getLogger(__name__)


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


def prune_checkpoints(
    store: Store, run: str, keep_last: int | None, newest: int, protect: Sequence[int] = ()
) -> CheckpointRetention:
    """Remove old checkpoints `{run}/iter-{i}/model` of `run`, keeping the newest `keep_last`.

    `newest` is the iteration just trained: its checkpoint is the one the next iteration starts
    from, so it is always kept (and must exist: `CheckpointError` otherwise, before anything is
    removed). Kept: the `keep_last` newest complete checkpoints (manifest present) of iterations
    1 .. `newest`. Removed: every checkpoint folder of an earlier iteration than the oldest kept
    one, complete or left over from a failed upload. Checkpoints of iterations after `newest` (left
    by an earlier run before a refresh) are not touched: the run rewrites them as it goes on. The
    seed M0 never lies in the run's folder and is never touched; neither is a local download cache.

    `protect`: iterations whose checkpoints stay whatever their age (the promoted base the next
    iteration starts from, when the newest M_i was not promoted).

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
        if iteration in protect:
            continue
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
        keep_last=keep_last,
        kept=[store.checkpoint_uri(run, iteration) for iteration in sorted({*kept, *(i for i in protect if i in complete)})],
        pruned=pruned
    )
