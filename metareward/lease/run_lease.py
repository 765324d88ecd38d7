"""Holding a run's lease: acquire, renew on a thread, take over an expired one, release; the process-wide holder stages check (`metareward.lease`)."""

from __future__ import annotations

import contextvars
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

from metareward.lease.backends import _S3LeaseObject, _backend, _command_line, lease_uri
from metareward.lease.holder import (
    ACQUIRE_ATTEMPTS,
    ACQUIRE_BACKOFF_S,
    _RACE_ROUNDS,
    LeaseHolder,
    RunLeaseHeld,
    RunLeaseLost,
    _Conflict,
    _iso,
)
from metareward.storage import StorageConfig, Store, is_transient_storage_error

logger = logging.getLogger(__name__)

class RunLease:
    """The lease of one named run in one store, for one writer.

        with RunLease(config.storage, config.name, flow_run_id=..., flow_run_name=...) as lease:
            ...            # lease.check() raises RunLeaseLost once another writer took it over

    `acquire()` raises `RunLeaseHeld` when another writer holds a lease that has not expired and
    takes an expired one over (logging a warning naming the previous holder). While held, a daemon
    thread renews it every `renew_s` seconds. `release()` stops the thread and deletes the lease
    object if it is still this lease's. `ttl_s` and `renew_s` default to the store config's
    `lease_ttl_s` and `lease_renew_s`.
    """

    def __init__(
        self,
        storage: StorageConfig | Store,
        run: str,
        *,
        ttl_s: float | None = None,
        renew_s: float | None = None,
        flow_run_id: str | None = None,
        flow_run_name: str | None = None,
        command: str | None = None,
    ):
        self.store = storage if isinstance(storage, Store) else Store(storage)
        self.run = run
        self.uri = lease_uri(self.store, run)
        self.ttl_s = float(self.store.config.lease_ttl_s if ttl_s is None else ttl_s)
        self.renew_s = float(self.store.config.lease_renew_s if renew_s is None else renew_s)
        if not 0 < self.renew_s < self.ttl_s:
            raise ValueError(f"lease renewal interval {self.renew_s} s must be above 0 and below its TTL {self.ttl_s} s")
        self._backend = _backend(self.store, self.uri)
        self._holder = LeaseHolder(
            token=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=os.getpid(),
            acquired_at=0.0,
            renewed_at=0.0,
            ttl_s=self.ttl_s,
            command=command if command is not None else _command_line(),
            flow_run_id=flow_run_id,
            flow_run_name=flow_run_name,
        )
        self._etag: str | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_renewed = 0.0  # time.monotonic() of the last successful write
        self._failures = 0
        self.held = False
        self.lost_reason: str | None = None
        self.took_over: LeaseHolder | None = None

    # ---- state --------------------------------------------------------------------------------

    @property
    def token(self) -> str:
        return self._holder.token  # type: ignore[return-value]

    @property
    def holder(self) -> LeaseHolder:
        return self._holder

    @property
    def lost(self) -> bool:
        return self.lost_reason is not None

    def check(self) -> None:
        """Raise `RunLeaseLost` if the lease was lost (taken over, or not renewed for a TTL)."""
        if self.lost_reason is not None:
            raise RunLeaseLost(self.lost_reason)

    def __repr__(self) -> str:
        state = "lost" if self.lost else "held" if self.held else "not held"
        return f"RunLease({self.uri!r}, {state})"

    # ---- acquire ------------------------------------------------------------------------------

    def acquire(self, attempts: int = ACQUIRE_ATTEMPTS) -> "RunLease":
        """Take the lease (or an expired one over); `RunLeaseHeld` when another writer has it.
        Transient storage errors are tried `attempts` times in all, with backoff (1 where the
        caller retries, like a Prefect task)."""
        if self.held:
            return self
        delay = ACQUIRE_BACKOFF_S
        for attempt in range(1, attempts + 1):
            try:
                self._acquire_once()
                break
            except Exception as error:
                if not is_transient_storage_error(error) or attempt >= attempts:
                    raise
                logger.warning("could not read or write the lease %s (%s); retrying in %.0f s", self.uri, error, delay)
                time.sleep(delay)
                delay *= 2
        self.held = True
        self._last_renewed = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.run}", daemon=True)
        self._thread.start()
        return self

    def _fresh_content(self, now: float, acquired: bool) -> bytes:
        self._holder = replace(self._holder, renewed_at=now, acquired_at=now if acquired else self._holder.acquired_at)
        return self._holder.to_json(self.run, self.renew_s)

    def _acquire_once(self) -> None:
        for _ in range(_RACE_ROUNDS):
            snapshot = self._backend.read()
            now = time.time()  # expiry is judged after the read, the content stamped just before the write
            if snapshot is None:
                try:
                    self._etag = self._backend.create(self._fresh_content(time.time(), acquired=True))
                except _Conflict:
                    continue  # someone created it between our read and our write: look again
                self.took_over = None
                break
            current = LeaseHolder.from_bytes(snapshot.data, snapshot.modified, self.ttl_s)
            if current.token == self.token:  # a retried request of ours had landed
                self._etag = snapshot.etag
                break
            if not current.expired(now):
                raise RunLeaseHeld(self.run, self.uri, current)
            try:
                self._etag = self._backend.replace(self._fresh_content(time.time(), acquired=True), snapshot.etag)
            except (_Conflict, FileNotFoundError):
                continue  # another taker won, or its holder released it just now: look again
            self.took_over = current
            break
        else:
            raise RuntimeError(f"the lease {self.uri} kept changing under {_RACE_ROUNDS} attempts to acquire it")
        # Read back: on a server that ignores conditional writes, the last writer's token is there.
        snapshot = self._backend.read()
        current = None if snapshot is None else LeaseHolder.from_bytes(snapshot.data, snapshot.modified, self.ttl_s)
        if current is None or current.token != self.token:
            raise RunLeaseHeld(self.run, self.uri, current or self._holder)
        self._etag = snapshot.etag
        if isinstance(self._backend, _S3LeaseObject) and not self._backend.probe_conditional(snapshot.data):
            logger.warning(
                "the S3 server of %s ignored a conditional write (If-None-Match): the lease of run %s is "
                "advisory only there; two writers starting at the same moment may both proceed", self.store.root, self.run,
            )
        if self.took_over is not None:
            logger.warning(
                "took over the lease of run %s left by %s/%s (expired at %s): %s",
                self.run, self.took_over.host, self.took_over.pid, _iso(self.took_over.expires_at), self.took_over.describe(),
            )
        else:
            logger.info("run %s: holding its writer lease %s (TTL %g s, renewed every %g s)", self.run, self.uri, self.ttl_s, self.renew_s)

    # ---- renew --------------------------------------------------------------------------------

    def set_flow_run(self, flow_run_id: str | None, flow_run_name: str | None) -> None:
        """Name the Prefect flow run that now writes under this lease, and write it out at once."""
        if (flow_run_id, flow_run_name) == (self._holder.flow_run_id, self._holder.flow_run_name):
            return
        with self._lock:
            self._holder = replace(self._holder, flow_run_id=flow_run_id, flow_run_name=flow_run_name)
        try:
            self.renew()
        except RunLeaseLost:
            raise
        except Exception as error:  # the next tick writes it; the lease itself is fine
            logger.warning("could not record flow run %s in the lease %s yet: %s", flow_run_name, self.uri, error)

    def renew(self) -> None:
        """Write `renewed_at = now` (If-Match on the version this lease wrote last). Raises
        `RunLeaseLost` if another writer holds the lease now; storage errors propagate."""
        with self._lock:
            self.check()
            if not self.held:
                raise RuntimeError(f"{self!r} is not held")
            for _ in range(_RACE_ROUNDS):
                snapshot = self._backend.read()
                if snapshot is None:
                    # Removed by hand (or by a cleanup): recreate it only if nobody else did.
                    try:
                        self._etag = self._backend.create(self._fresh_content(time.time(), acquired=False))
                    except _Conflict:
                        continue
                    logger.warning("the lease %s of run %s had been removed; recreated it", self.uri, self.run)
                    break
                current = LeaseHolder.from_bytes(snapshot.data, snapshot.modified, self.ttl_s)
                if current.token != self.token:
                    self._lose(f"another writer took over the lease of run {self.run}: {current.describe()}")
                    self.check()
                self._etag = snapshot.etag  # ours (a retried write of ours may have landed)
                try:
                    self._etag = self._backend.replace(self._fresh_content(time.time(), acquired=False), snapshot.etag)
                except (_Conflict, FileNotFoundError):
                    continue  # changed between our read and our write: look at it again
                break
            else:
                raise RuntimeError(f"the lease {self.uri} kept changing under {_RACE_ROUNDS} attempts to renew it")
            self._last_renewed = time.monotonic()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            if self.lost:
                return
            try:
                self.renew()
            except RunLeaseLost:
                return
            except Exception as error:
                self._failures += 1
                silent_for = time.monotonic() - self._last_renewed
                if silent_for >= self.ttl_s:
                    self._lose(
                        f"could not renew the lease of run {self.run} for {silent_for:.0f} s, longer than its TTL "
                        f"{self.ttl_s:g} s (last error: {error}); another writer may have taken it over"
                    )
                    return
                logger.warning(
                    "could not renew the lease %s (%s); retrying in %g s, giving up %.0f s from now",
                    self.uri, error, self.renew_s, self.ttl_s - silent_for,
                )
                continue
            if self._failures:
                logger.info("renewed the lease %s again after %d failed attempt(s)", self.uri, self._failures)
                self._failures = 0

    def _lose(self, reason: str) -> None:
        if self.lost_reason is None:
            lost_reason = f"{reason}. This process stops before it writes more to run {self.run}."
            # Logged before it is set: whoever sees the lease lost finds the log line already written.
            logger.error("lost the writer lease of run %s: %s", self.run, lost_reason)
            self.lost_reason = lost_reason

    # ---- release ------------------------------------------------------------------------------

    def release(self) -> None:
        """Stop renewing and delete the lease object if it is still this lease's. Storage errors are
        logged, not raised: the lease then expires by itself after its TTL."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.renew_s + 60)
        with self._lock:
            self.held = False
            if self.lost:
                return
            try:
                snapshot = self._backend.read()
                if snapshot is None:
                    return
                current = LeaseHolder.from_bytes(snapshot.data, snapshot.modified, self.ttl_s)
                if current.token != self.token:
                    logger.warning("left the lease %s alone on release: it is another writer's now (%s)", self.uri, current.describe())
                    return
                self._backend.delete(snapshot.etag)
            except _Conflict:
                logger.warning("left the lease %s alone on release: it changed just before (another writer took it over)", self.uri)
            except Exception as error:
                logger.warning(
                    "could not release the lease %s (%s); it expires by itself at %s", self.uri, error, _iso(self._holder.expires_at)
                )

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        lost = self.lost_reason
        self.release()
        if lost is not None and exc_type is None:
            raise RunLeaseLost(lost)  # the work finished, but not as the run's only writer: say so


# ----------------------------------------------------------------------------------------------
# holding a run's lease across the CLI, its flow and the flow's subflows

_HELD: contextvars.ContextVar[tuple[RunLease, ...]] = contextvars.ContextVar("metareward_run_leases", default=())


def held_lease(storage: StorageConfig | Store, run: str) -> RunLease | None:
    """The lease of `run` that this context (the CLI command, the flow and its subflows and tasks) holds."""
    held = _HELD.get()
    if not held:
        return None
    store = storage if isinstance(storage, Store) else Store(storage)
    uri = lease_uri(store, run)
    for lease in reversed(held):
        if lease.uri == uri and lease.held:
            return lease
    return None


@contextmanager
def hold_run_lease(
    storage: StorageConfig | Store,
    run: str,
    *,
    flow_run_id: str | None = None,
    flow_run_name: str | None = None,
    command: str | None = None,
    lease: RunLease | None = None,
) -> Iterator[RunLease]:
    """Hold the run's lease for the block: acquire it, or, when the caller already holds it (the
    CLI before the flow, the run flow before an evaluation subflow), use that one and record the
    flow run in it unless an outer flow run is recorded already. Raises `RunLeaseHeld` when another
    writer has it. `lease`: one acquired already (by a retried task), held and released here."""
    outer = held_lease(storage, run)
    if lease is not None and outer is None:
        with lease:  # acquired already: entering it is a no-op, leaving it releases it
            token = _HELD.set(_HELD.get() + (lease,))
            try:
                yield lease
            finally:
                _forget(token, lease)
        return
    if lease is not None:  # taken although the caller held one: keep the caller's
        lease.release()
    if outer is not None:
        outer.check()
        if (flow_run_id or flow_run_name) and not (outer.holder.flow_run_id or outer.holder.flow_run_name):
            outer.set_flow_run(flow_run_id, flow_run_name)  # the outermost flow run names the writer
        yield outer
        return
    lease = RunLease(storage, run, flow_run_id=flow_run_id, flow_run_name=flow_run_name, command=command)
    with lease:
        token = _HELD.set(_HELD.get() + (lease,))
        try:
            yield lease
        finally:
            _forget(token, lease)


def _forget(token: contextvars.Token, lease: RunLease) -> None:
    try:
        _HELD.reset(token)
    except ValueError:  # left in another context: drop it by hand
        _HELD.set(tuple(held for held in _HELD.get() if held is not lease))


def check_lease(storage: StorageConfig | Store, run: str) -> None:
    """Raise `RunLeaseLost` if this context holds the run's lease and has lost it (a stage calls
    this before it writes). Without a lease held here (a flow called directly), nothing to check."""
    lease = held_lease(storage, run)
    if lease is not None:
        lease.check()
