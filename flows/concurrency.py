"""Prefect global concurrency slots that keep flows off each other's run and GPUs.

- One slot per named run, limit `metareward-run-{name}` of size 1: `run_flow` holds it for its
  whole body, so the manual and the nightly deployment never work on the same run at once while
  different runs proceed side by side. A caller either waits for the slot (the manual deployment,
  the CLI) or gives up after `SKIP_AFTER_S` (the nightly deployment: tonight's run is skipped
  when last night's still works on the run).
- One slot per GPU, limits `gpu-{host}-{device}` of size 1, one per GPU this process sees
  (`CUDA_VISIBLE_DEVICES`, else every device torch counts). An iteration holds all of them from
  generate through train (`iteration_flow`): the engines stay loaded across generate, judge and
  meta-judge and are released only before DPO, so a per-task slot would let another flow onto a
  GPU whose memory our engine still holds. On a machine without a GPU no slot is taken.

Slots guard deployment runs only: those a worker or `serve()` starts, in a process of their own
with `PREFECT__FLOW_RUN_ID` set (subflows run in that process too). A flow called in the caller's
own process (`metareward run`, tests) holds none: that process often talks to a temporary API, which
runs no repossessor, so the slots of a killed caller would never come back and the run could never
resume.

The limits are created on demand (size 1, through the Prefect API) the first time a flow asks
for them; `prefect gcl ls` lists them. Slots are leases that the holder renews; when its process
dies they expire after `LEASE_S`, so a killed worker does not block the run or the GPU for good.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists

RUN_SLOT_PREFIX = "metareward-run-"
GPU_SLOT_PREFIX = "gpu-"
# How long a caller that would rather skip waits for a busy run's slot (the API is polled).
SKIP_AFTER_S = 10.0
# A held slot's lease; the holder renews it, a dead holder's slot comes back after this.
LEASE_S = 300.0


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def run_slot_name(run: str) -> str:
    """The limit that one named run's flows share."""
    return f"{RUN_SLOT_PREFIX}{_slug(run)}"


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as `CUDA_VISIBLE_DEVICES` names them (indices or UUIDs),
    else torch's device indices; empty without a GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [device.strip() for device in visible.split(",") if device.strip() and device.strip() != "-1"]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def gpu_slot_names(devices: list[str] | None = None, host: str | None = None) -> list[str]:
    """One limit per GPU of this machine: `gpu-{host}-{device}`."""
    devices = visible_gpus() if devices is None else devices
    host = _slug(host or socket.gethostname())
    return [f"{GPU_SLOT_PREFIX}{host}-{_slug(device)}" for device in devices]


def started_by_a_deployment() -> bool:
    """Whether this process runs a deployment's flow run (a worker or `serve()` started it)."""
    return "PREFECT__FLOW_RUN_ID" in os.environ


def ensure_limits(names: list[str]) -> None:
    """Create each limit with one slot unless it exists (a limit someone resized is left alone)."""
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass


@contextmanager
def hold_slots(names: list[str], what: str, wait: bool = True) -> Iterator[bool]:
    """Hold one slot of each limit in `names` (created on demand) for the `with` block.

    Yields True once held. With `wait=False` it gives up after `SKIP_AFTER_S` and yields False
    (the block decides what to do without the slots). No names, or not a deployment run: yields
    True at once and holds nothing.
    """
    if not names or not started_by_a_deployment():
        yield True
        return
    logger = get_run_logger()
    ensure_limits(names)
    held = ExitStack()
    try:
        held.enter_context(
            concurrency(
                names,
                occupy=1,
                timeout_seconds=None if wait else SKIP_AFTER_S,
                lease_duration=LEASE_S,
                strict=True,
                raise_on_lease_renewal_failure=False,
            )
        )
    except TimeoutError:
        if wait:
            raise
        logger.info("%s: %s is held by another flow run", what, ", ".join(names))
        yield False
        return
    with held:
        logger.info("%s: holding %s", what, ", ".join(names))
        yield True
