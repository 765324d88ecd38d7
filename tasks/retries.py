"""Which task failures are retried, and how often.

Every stage task retries with exponential backoff, but only faults that may pass by themselves:

- object storage: whatever `metareward.storage.is_transient_storage_error` calls transient
  (connection refused or reset, timeouts, throttling, HTTP 5xx);
- the network and a remote engine: `httpx` transport errors (connect, read, write, pool
  timeouts, a dropped connection), HTTP 429 and 5xx answers, `ConnectionError`, `TimeoutError`;
- Ray: a worker or node that died under a shard more often than Ray re-runs it (`WorkerCrashedError`,
  `NodeDiedError`, `ObjectLostError`, other `RaySystemError`s), and a shard past its deadline
  (`tasks.shards.ShardDeadlineExceeded`, a `TimeoutError`);
- the GPU: CUDA out of memory (`torch.cuda.OutOfMemoryError`, or a RuntimeError saying
  "CUDA out of memory"), since another process may have held the memory for a while.

Anything else (a bad config value, a missing input file, a checkpoint that does not match its
hash, a bug) fails the task at once with its own message, which names the field or file.

The delays are `BACKOFF_BASE_S * 2**attempt` (2, 4, 8, 16, 32 s: an outage of up to about a minute
is ridden out), each stretched by up to `RETRY_JITTER` so that several runs do not retry in step.
A retried stage resumes from the shards it already committed.
"""

from __future__ import annotations

import sys
from typing import Any

from prefect.tasks import exponential_backoff

from metareward.storage import is_transient_storage_error

TRANSIENT_RETRIES = 5
BACKOFF_BASE_S = 2.0
RETRY_JITTER = 0.2

RETRY_OPTIONS: dict[str, Any] = {
    "retries": TRANSIENT_RETRIES,
    "retry_delay_seconds": exponential_backoff(backoff_factor=BACKOFF_BASE_S),
    "retry_jitter_factor": RETRY_JITTER,
}


def _causes(exc: BaseException):
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_cuda_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")  # a CUDA OOM can only come from a torch that is imported already
    if torch is not None and isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


def _is_transient_network(exc: BaseException) -> bool:
    httpx = sys.modules.get("httpx")
    if httpx is not None:
        if isinstance(exc, httpx.TransportError):
            return True
        if isinstance(exc, httpx.HTTPStatusError):
            status = exc.response.status_code
            return status == 429 or status >= 500
    return isinstance(exc, (ConnectionError, TimeoutError))


def _is_ray_system_fault(exc: BaseException) -> bool:
    ray_exceptions = sys.modules.get("ray.exceptions")  # only raised where ray is imported already
    if ray_exceptions is None:
        return False
    system_faults = (
        ray_exceptions.RaySystemError,
        ray_exceptions.WorkerCrashedError,
        ray_exceptions.NodeDiedError,
        ray_exceptions.ObjectLostError,
    )
    return isinstance(exc, system_faults)


def is_transient_fault(exc: BaseException) -> bool:
    """True when retrying the task may succeed (see the module docstring). Follows the cause chain."""
    if is_transient_storage_error(exc):
        return True
    return any(
        _is_cuda_oom(cause) or _is_transient_network(cause) or _is_ray_system_fault(cause) for cause in _causes(exc)
    )


def retry_on_transient_fault(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry a failed stage task only for a transient fault."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient_fault(exc)
