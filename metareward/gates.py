"""What a gate decided and which checkpoint an iteration promoted, as records in the run's store.

    {root}/{run}/iter-{i}/gates/{gate}.json   the gate's decision: passed, warned, stopped, approved,
                                              rejected, timed_out or cancelled; by whom, why, and the
                                              fingerprint of the checks it answered
    {root}/{run}/iter-{i}/promotion.json      the iteration's base M_{i-1}, its M_i, whether M_i was
                                              promoted (the next iteration's base) and why

A person's decision (approved / rejected) is reused for the same checks (same fingerprint), so a
resumed run does not ask again; other checks ask again. The promotion record is the iteration's last
write: an iteration counts as complete once it is there (`metareward.runs`). Pure: the store only;
the pausing and the Prefect events live in `flows.gates`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from metareward.checkpoints import ModelRef
from metareward.checks import Gate
from metareward.storage import Store, slug

Decision = Literal["passed", "warned", "stopped", "approved", "rejected", "timed_out", "cancelled"]
PERSON_DECISIONS: tuple[Decision, ...] = ("approved", "rejected")
GATES_DIR = "gates"
PROMOTION_FILE = "promotion.json"


class GateDecision(BaseModel):
    """The form a person fills in to answer a waiting gate (the Prefect UI's resume form, or
    `metareward approve`)."""

    model_config = ConfigDict(extra="forbid")

    approve: bool = Field(description="Approve: go on (train on these judgments / promote M_i). Leave off to reject.")
    reason: str = Field(default="", description="Why: kept with the decision in the run's store.")
    by: str = Field(default="prefect-ui", description="Who decides (a name or an email).")


class GateRecord(BaseModel):
    """A gate's decision on one set of check results."""

    model_config = ConfigDict(extra="forbid")

    gate: Gate
    iteration: int
    checks_key: str
    failed: list[str] = Field(default_factory=list)
    policy: str
    decision: Decision
    by: str = ""
    reason: str = ""
    at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


class PromotionRecord(BaseModel):
    """Whether iteration i's M_i became the base of the next iteration.

    base: the checkpoint the iteration started from. model: its M_i (None: it trained nothing).
    promoted: M_i is the next iteration's base. reason: why (or why not).
    """

    model_config = ConfigDict(extra="forbid")

    iteration: int
    base: ModelRef
    model: ModelRef | None
    promoted: bool
    reason: str


def pause_key(run: str, iteration: int, gate: Gate) -> str:
    """The key of a gate's pause (Prefect's `pause_key`): `{run}-iter-{i}-{gate}`, lowercase, dashes."""
    raw = f"{run}-iter-{iteration}-{gate}"
    return slug(raw)


def gate_uri(store: Store, run: str, iteration: int, gate: Gate) -> str:
    return store.join(store.iteration_uri(run, iteration), GATES_DIR, f"{gate}.json")


def write_gate_record(store: Store, run: str, record: GateRecord) -> str:
    return store.write_json(record.model_dump(mode="json"), gate_uri(store, run, record.iteration, record.gate))


def read_gate_record(store: Store, run: str, iteration: int, gate: Gate) -> GateRecord | None:
    uri = gate_uri(store, run, iteration, gate)
    return GateRecord.model_validate(store.read_json(uri)) if store.exists(uri) else None


def person_decision(store: Store, run: str, iteration: int, gate: Gate, checks_key: str) -> GateRecord | None:
    """A person's stored answer to exactly these checks, if any."""
    record = read_gate_record(store, run, iteration, gate)
    if record is not None and record.decision in PERSON_DECISIONS and record.checks_key == checks_key:
        return record
    return None


def promotion_uri(store: Store, run: str, iteration: int) -> str:
    return store.join(store.iteration_uri(run, iteration), PROMOTION_FILE)


def write_promotion(store: Store, run: str, record: PromotionRecord) -> str:
    return store.write_json(record.model_dump(mode="json"), promotion_uri(store, run, record.iteration))


def read_promotion(store: Store, run: str, iteration: int) -> PromotionRecord | None:
    uri = promotion_uri(store, run, iteration)
    return PromotionRecord.model_validate(store.read_json(uri)) if store.exists(uri) else None
