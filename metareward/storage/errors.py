"""Storage errors and their classification: transient (retry) or not; every message names the URI."""

from __future__ import annotations

import errno
from contextlib import contextmanager
from typing import Iterator


class StorageError(OSError):
    """A storage operation failed; the message names the URI. Retrying will not help unless the
    error is a `TransientStorageError`."""


class TransientStorageError(StorageError):
    """A storage operation failed for a reason that may pass (connection refused or reset, timeout,
    throttling, a 5xx from the server); retrying with backoff is the right response."""


# ----------------------------------------------------------------------------------------------
# error classification

# errno values that mean "the network or the server had a moment": EBUSY and EREMOTEIO are what
# s3fs turns SlowDown/503 and InternalError/500 into.
_TRANSIENT_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.EAGAIN,
    errno.EBUSY,
    getattr(errno, "EREMOTEIO", errno.EIO + 1000),
}
_TRANSIENT_S3_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "BandwidthLimitExceeded",
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
}
_PERMANENT_TYPES = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)


def is_transient_storage_error(exc: BaseException) -> bool:
    """True when retrying the storage call may succeed.

    Transient: connection refused/reset/aborted, timeouts, the server closing the connection,
    throttling (`SlowDown`, `Throttling`, HTTP 429) and server errors (HTTP 5xx, `InternalError`,
    `ServiceUnavailable`), from botocore, aiobotocore/aiohttp, fsspec or plain `OSError`s.
    Not transient: missing files or buckets, permission and bad-credential errors, bad requests,
    anything else. The exception's cause chain is followed, since s3fs wraps botocore errors.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        verdict = _classify(current)
        if verdict is not None:
            return verdict
        current = current.__cause__ or current.__context__
    return False


def _classify(exc: BaseException) -> bool | None:
    """True/False when this exception alone decides, None to look at its cause."""
    if isinstance(exc, TransientStorageError):
        return True
    if isinstance(exc, StorageError):  # classified when it was raised
        return False
    if isinstance(exc, _PERMANENT_TYPES):
        return False
    try:
        import botocore.exceptions as bexc
    except ImportError:  # only the local backend is installed
        bexc = None
    if bexc is not None:
        if isinstance(exc, (bexc.NoCredentialsError, bexc.PartialCredentialsError, bexc.ParamValidationError)):
            return False
        if isinstance(exc, (bexc.ConnectionError, bexc.HTTPClientError)):
            return True
        if isinstance(exc, bexc.ClientError):
            error = exc.response.get("Error", {}) if isinstance(exc.response, dict) else {}
            status = (exc.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode") if isinstance(exc.response, dict) else None
            code = str(error.get("Code", ""))
            if code in _TRANSIENT_S3_CODES or code in {"429", "500", "502", "503", "504"}:
                return True
            return bool(status is not None and (status == 429 or status >= 500))
    try:
        import aiohttp
    except ImportError:
        aiohttp = None
    if aiohttp is not None and isinstance(
        exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ServerTimeoutError)
    ):
        return True
    from fsspec.exceptions import FSTimeoutError

    if isinstance(exc, (FSTimeoutError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    return None


@contextmanager
def _storage_errors(action: str, uri: str) -> Iterator[None]:
    """Re-raise storage failures with the action and URI in the message, keeping the cause."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise FileNotFoundError(errno.ENOENT, f"cannot {action} {uri}: not found ({exc})", uri) from exc
    except PermissionError as exc:
        raise PermissionError(
            errno.EACCES,
            f"cannot {action} {uri}: permission denied ({exc}); check the credentials and the bucket policy",
            uri,
        ) from exc
    except Exception as exc:
        if is_transient_storage_error(exc):
            raise TransientStorageError(f"cannot {action} {uri}: transient storage error, retrying may help ({exc})") from exc
        if isinstance(exc, OSError) or _is_botocore_error(exc):
            raise StorageError(f"cannot {action} {uri}: {exc}") from exc
        raise


def _is_botocore_error(exc: BaseException) -> bool:
    try:
        import botocore.exceptions as bexc
    except ImportError:
        return False
    return isinstance(exc, (bexc.BotoCoreError, bexc.ClientError))
