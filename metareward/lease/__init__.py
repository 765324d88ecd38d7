"""One writer per run: a lease object in the run's own folder of the store.

A named run in a store gets one writer at a time. The writer holds `{root}/{run}/_lease.json`, a
small JSON object naming it (host, pid, command, Prefect flow run when known, since when, time to
live), created only if absent and renewed every `storage.lease_renew_s` seconds (default 30) by a
background thread while the writer works, waits at a gate or for a GPU slot. A second writer is
refused before it does any work (`RunLeaseHeld`, naming the holder). A lease whose
`renewed_at + ttl_s` lies in the past (its writer was killed, or lost its storage for longer than
the TTL) is taken over, and the log says so. Read-only commands never touch it.

How each store makes "only one wins":

- S3: the lease is created with `PutObject` and `If-None-Match: *` (the server answers 412
  PreconditionFailed when it exists), renewed and taken over with `If-Match: <ETag>` of the version
  read (412 when someone else wrote it since), and released with `DeleteObject` and `If-Match`.
  The requests go through s3fs's `call_s3`, i.e. aiobotocore with botocore's `IfNoneMatch` /
  `IfMatch` parameters. AWS S3, MinIO and moto honour them. A server that ignores them (`rclone
  serve s3` does) makes the lease advisory only: every write is preceded by a read and followed
  by a read-back, which catches most but not all races, and acquiring warns once that the server
  ignored a conditional write.
- A local folder: the lease is created with a hard link from a fully written temporary file (an
  atomic create-if-absent with whole content; `O_CREAT | O_EXCL` where hard links are not
  supported), and renewed, taken over and released under an exclusive `flock` on `_lease.lock`
  beside it, comparing the sha256 of the file's bytes (its "ETag") before replacing it with
  `os.replace`. This holds between any processes of one machine, and on a network filesystem as
  far as its locks are honoured (NFSv4 with working locks: yes; a filesystem without POSIX locks:
  no guarantee).

Expiry is judged by the reader's clock against the holder's `renewed_at`: the machines that may
write one run should agree on the time within a small fraction of the TTL (NTP does).

A holder that cannot renew (storage down) keeps trying on every tick and only gives the lease up
once a whole TTL has passed without a successful renewal; a holder that finds its lease taken by
another writer marks it lost. Either way `check()` then raises `RunLeaseLost`, and the stage tasks
call it before they write (`check_lease`), so the process stops at its next stage instead of
writing beside the new holder. No Prefect here: the flows and the CLI pass the flow run's id and name in.
"""

from metareward.lease.holder import LEASE_FILE, LeaseHolder, RunLeaseHeld, RunLeaseLost
from metareward.lease.backends import lease_uri, read_lease
from metareward.lease.run_lease import RunLease, check_lease, held_lease, hold_run_lease

__all__ = ["LEASE_FILE", "LeaseHolder", "RunLease", "RunLeaseHeld", "RunLeaseLost", "check_lease", "held_lease", "hold_run_lease", "lease_uri", "read_lease"]
