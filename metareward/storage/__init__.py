"""Artifact storage: a local folder or an S3 bucket, atomic writes, sharded artifacts with manifests.

Supported roots (`StorageConfig.root`): a local folder (a plain path such as `./runs`, or a
`file://` URL) and S3 or any S3-compatible server (`s3://bucket/prefix`, through s3fs). The bucket
must exist; the store never creates buckets.

Layout (documented in `docs/artifacts.md`, "Storage layout"):

    {root}/{run}/iter-{i}/{stage}/data.parquet     the artifact's table (every row exactly once)
    {root}/{run}/iter-{i}/{stage}/manifest.json    written last: the artifact is complete once it exists
    {root}/{run}/iter-{i}/{stage}/shards/          shard files and plan.json while a sharded stage runs
    {root}/{run}/iter-{i}/model/                   the checkpoint M_i of iteration i

Atomicity: no reader ever sees half a file. On a local folder a file is written under a temporary
name beside the target (`.{name}.tmp-{uuid}`) and renamed over it (`os.replace`, atomic on POSIX).
On S3 an object is sent in one request (a single PUT, or a multipart upload that only appears
when it completes), so the object under the final name is always whole.

Credentials never appear in the config, in `repr(store)` or in this module's logs: the config only
names the environment variables that hold them.

Modules: `config` (StorageConfig), `errors` (StorageError, transient or not), `names` (run-name
checks, temporary names), `store` (Store: the filesystem, atomic writes), `artifacts` (manifests),
`sharded` (ShardedArtifact). The public names are imported from here.
"""

from metareward.storage.artifacts import (
    ARTIFACT_FORMAT,
    DATA_FILE,
    ArtifactInfo,
    is_complete,
    read_artifact,
    read_manifest,
    write_artifact,
)
from metareward.storage.config import ChecksumMode, StorageConfig
from metareward.storage.errors import StorageError, TransientStorageError, is_transient_storage_error
from metareward.storage.names import MANIFEST_FILE, TEMP_MARK, slug, validate_run_name
from metareward.storage.sharded import PLAN_FILE, SHARDS_DIR, ShardedArtifact
from metareward.storage.store import Store, parquet_bytes

__all__ = [
    "ARTIFACT_FORMAT",
    "DATA_FILE",
    "MANIFEST_FILE",
    "PLAN_FILE",
    "SHARDS_DIR",
    "TEMP_MARK",
    "ArtifactInfo",
    "ChecksumMode",
    "ShardedArtifact",
    "StorageConfig",
    "StorageError",
    "Store",
    "TransientStorageError",
    "is_complete",
    "is_transient_storage_error",
    "parquet_bytes",
    "read_artifact",
    "read_manifest",
    "slug",
    "validate_run_name",
    "write_artifact",
]
