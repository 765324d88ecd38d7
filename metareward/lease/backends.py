"""Where the lease lives and how each store makes "only one wins": a local file under flock, an S3 object with conditional writes (`metareward.lease`)."""

from __future__ import annotations

import errno
import sys
import hashlib
import json
import logging
import os
import uuid
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Iterator

from metareward.lease.holder import LEASE_FILE, LOCK_FILE, LeaseHolder, _Conflict, _Snapshot
from metareward.storage import Store

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# the two kinds of store


class _LocalLeaseFile:
    """The lease as a file of a local folder; changes under an exclusive flock on `_lease.lock`."""

    conditional = True

    def __init__(self, path: str):
        self.path = path
        self.directory = os.path.dirname(path)
        self.lock_path = os.path.join(self.directory, LOCK_FILE)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when the descriptor closes, also when the process dies
            yield
        finally:
            os.close(fd)

    def read(self) -> _Snapshot | None:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
                modified = os.fstat(handle.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return _Snapshot(data, hashlib.sha256(data).hexdigest(), modified)

    def _temp(self, data: bytes) -> str:
        temp = os.path.join(self.directory, f".{LEASE_FILE}.tmp-{uuid.uuid4().hex}")
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return temp

    def create(self, data: bytes) -> str:
        with self._locked():
            temp = self._temp(data)
            try:
                try:
                    os.link(temp, self.path)  # fails with EEXIST if present; the content is whole at once
                except FileExistsError:
                    raise _Conflict() from None
                except OSError as error:
                    if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
                        raise
                    self._create_exclusive(data)
            finally:
                try:
                    os.remove(temp)
                except OSError:
                    pass
        return hashlib.sha256(data).hexdigest()

    def _create_exclusive(self, data: bytes) -> None:
        """Create-if-absent on a filesystem without hard links: O_EXCL, then the content."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise _Conflict() from None
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def replace(self, data: bytes, etag: str) -> str:
        with self._locked():
            current = self.read()
            if current is None:
                raise FileNotFoundError(errno.ENOENT, "lease is gone", self.path)
            if current.etag != etag:
                raise _Conflict()
            temp = self._temp(data)
            try:
                os.replace(temp, self.path)
            except BaseException:
                os.remove(temp)
                raise
        return hashlib.sha256(data).hexdigest()

    def delete(self, etag: str) -> None:
        with self._locked():
            current = self.read()
            if current is None:
                return
            if current.etag != etag:
                raise _Conflict()
            os.remove(self.path)


_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_MISSING_CODES = {"NoSuchKey", "404"}


def _s3_code(exc: BaseException) -> str | None:
    """The S3 error code of a (wrapped) botocore ClientError, else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        response = getattr(current, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            return str(response["Error"].get("Code", ""))
        current = current.__cause__ or current.__context__
    return None


class _S3LeaseObject:
    """The lease as an S3 object, written with conditional requests (If-None-Match / If-Match)."""

    def __init__(self, store: Store, uri: str):
        self.fs = store.fs
        self.bucket, self.key = uri.split("://", 1)[1].split("/", 1)
        self.conditional = True  # until the server shows otherwise

    def _call(self, method: str, **kwargs) -> dict[str, Any]:
        try:
            return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
        except FileExistsError:  # s3fs's translation of 412 on If-None-Match
            raise _Conflict() from None
        except Exception as error:
            code = _s3_code(error)
            if code in _CONFLICT_CODES:
                raise _Conflict() from None
            if code in _MISSING_CODES and not isinstance(error, FileNotFoundError):
                raise FileNotFoundError(errno.ENOENT, f"s3://{self.bucket}/{self.key} is gone") from error
            raise

    def read(self) -> _Snapshot | None:
        from fsspec.asyn import sync

        async def get():
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                body = await response["Body"].read()
            finally:
                response["Body"].close()
            return body, response["ETag"], response.get("LastModified")

        try:
            body, etag, modified = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        return _Snapshot(body, etag, modified.timestamp() if modified is not None else None)

    def create(self, data: bytes) -> str:
        response = self._call("put_object", Body=data, IfNoneMatch="*", ContentType="application/json")
        return response["ETag"]

    def replace(self, data: bytes, etag: str) -> str:
        response = self._call("put_object", Body=data, IfMatch=etag, ContentType="application/json")
        return response["ETag"]

    def delete(self, etag: str) -> None:
        try:
            self._call("delete_object", IfMatch=etag)
        except FileNotFoundError:
            pass

    def probe_conditional(self, data: bytes) -> bool:
        """Whether the server refuses a create-if-absent of the (existing) lease object: sends the
        same bytes again with If-None-Match, which a server that ignores it rewrites unchanged."""
        try:
            self._call("put_object", Body=data, IfNoneMatch="*", ContentType="application/json")
        except _Conflict:
            return True
        self.conditional = False
        return False


# ----------------------------------------------------------------------------------------------
# the lease


def lease_uri(store: Store, run: str) -> str:
    """`{root}/{run}/_lease.json`: where the run's lease object lives."""
    return store.join(store.run_uri(run), LEASE_FILE)


def read_lease(store: Store, run: str) -> LeaseHolder | None:
    """The run's current lease holder (expired or not), or None when the run has no lease."""
    backend = _backend(store, lease_uri(store, run))
    snapshot = backend.read()
    if snapshot is None:
        return None
    return LeaseHolder.from_bytes(snapshot.data, snapshot.modified, store.config.lease_ttl_s)


def _backend(store: Store, uri: str):
    return _LocalLeaseFile(uri) if store.protocol == "file" else _S3LeaseObject(store, uri)


def _command_line() -> str:
    line = " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])
    return line if len(line) <= 200 else line[:197] + "..."


