"""The lease object: who holds it (`LeaseHolder`), its errors and file names (`metareward.lease`)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

logger = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
LOCK_FILE = "_lease.lock"
LEASE_FORMAT = "metareward.lease/1"
# How often acquiring retries a transient storage error, and the first delay (doubled each time).
ACQUIRE_ATTEMPTS = 5
ACQUIRE_BACKOFF_S = 1.0
# Rounds of read-then-write while other writers keep changing the lease under us.
_RACE_ROUNDS = 6


class RunLeaseHeld(RuntimeError):
    """Another writer holds the run's lease and it has not expired: this one must not start.

    Attributes: `run`, `uri` (the lease object) and `holder` (a `LeaseHolder`)."""

    def __init__(self, run: str, uri: str, holder: "LeaseHolder"):
        self.run, self.uri, self.holder = run, uri, holder
        super().__init__(
            f"run {run} already has a writer: {holder.describe()}. Refused before any work, so nothing "
            f"was changed. Wait for that writer to finish or stop it; a lease left by a killed run is "
            f"taken over once it expires (storage.lease_ttl_s). Lease: {uri}"
        )


class RunLeaseLost(RuntimeError):
    """This process's lease of a run was taken over by another writer, or could not be renewed
    for a whole TTL: it must stop before it writes more."""


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_time(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def _short(seconds: float) -> str:
    seconds = abs(seconds)
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds a run's lease, as its lease object says.

    `token` is unique per acquisition (two processes never share one). Times are Unix seconds.
    `readable` is False for a lease object that is not valid JSON (a writer killed while creating
    it on a filesystem without hard links): then `renewed_at` is the object's modification time.
    """

    token: str | None
    host: str
    pid: int | None
    acquired_at: float
    renewed_at: float
    ttl_s: float
    command: str | None = None
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    readable: bool = True

    @property
    def expires_at(self) -> float:
        return self.renewed_at + self.ttl_s

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) > self.expires_at

    def describe(self, now: float | None = None) -> str:
        """One line: host, pid, flow run, command, since when, and when the lease expires."""
        now = time.time() if now is None else now
        if not self.readable:
            return f"an unreadable lease object last written {_iso(self.renewed_at)} (expires {_iso(self.expires_at)})"
        parts = [f"host {self.host}", f"pid {self.pid}"]
        if self.flow_run_name or self.flow_run_id:
            parts.append(f"flow run {self.flow_run_name or '?'} ({self.flow_run_id or 'id unknown'})")
        if self.command:
            parts.append(f"command `{self.command}`")
        ago = now - self.renewed_at
        renewed = f"renewed {_short(ago)} ago" if ago >= 0 else f"renewed {_short(ago)} in the future by this machine's clock"
        expiry = "expired" if self.expired(now) else "expires"
        return f"{', '.join(parts)}, since {_iso(self.acquired_at)} ({renewed}; {expiry} {_iso(self.expires_at)})"

    def to_json(self, run: str, renew_s: float) -> bytes:
        body = {
            "format": LEASE_FORMAT,
            "run": run,
            "token": self.token,
            "host": self.host,
            "pid": self.pid,
            "command": self.command,
            "flow_run_id": self.flow_run_id,
            "flow_run_name": self.flow_run_name,
            "acquired_at": _iso(self.acquired_at),
            "renewed_at": _iso(self.renewed_at),
            "expires_at": _iso(self.expires_at),
            "ttl_s": self.ttl_s,
            "renew_s": renew_s,
        }
        return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, modified: float | None, default_ttl_s: float) -> "LeaseHolder":
        """Parse a lease object; an unreadable one expires `default_ttl_s` after it was last written."""
        try:
            body = json.loads(data.decode("utf-8"))
            renewed = _parse_time(body["renewed_at"])
            if not isinstance(body, dict) or renewed is None:
                raise ValueError("no renewed_at")
            return cls(
                token=str(body.get("token")) if body.get("token") else None,
                host=str(body.get("host") or "?"),
                pid=body.get("pid"),
                acquired_at=_parse_time(body.get("acquired_at")) or renewed,
                renewed_at=renewed,
                ttl_s=float(body.get("ttl_s") or default_ttl_s),
                command=body.get("command"),
                flow_run_id=body.get("flow_run_id"),
                flow_run_name=body.get("flow_run_name"),
            )
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            stamp = time.time() if modified is None else modified
            return cls(token=None, host="?", pid=None, acquired_at=stamp, renewed_at=stamp, ttl_s=default_ttl_s, readable=False)


@dataclass(frozen=True)
class _Snapshot:
    data: bytes
    etag: str
    modified: float | None


class _Conflict(Exception):
    """A conditional write or delete lost: the object was created or changed by someone else."""


