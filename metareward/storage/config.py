"""Where a run's artifacts and checkpoints are stored: `StorageConfig` (a local folder or S3).

Credentials never appear in the config: it only names the environment variables that hold them.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ChecksumMode = Literal["auto", "when_supported", "when_required"]


class StorageConfig(BaseModel):
    """Where a run's artifacts and checkpoints are stored.

    Parameters:
        > Location

        root (`str`, *optional*, defaults to `"./runs"`):
            fsspec URL of the storage root: a local folder (`./runs`, `/data/runs`, `file:///data/runs`)
            or `s3://bucket/prefix` (S3 or an S3-compatible server; the bucket must exist).
        endpoint_url (`str` or `None`, *optional*, defaults to `None`):
            S3 endpoint of a non-AWS server, e.g. `http://127.0.0.1:9000`. `None` takes it from the
            environment (`AWS_ENDPOINT_URL_S3`, then `AWS_ENDPOINT_URL`); when neither is set, AWS.
        region (`str` or `None`, *optional*, defaults to `None`):
            S3 region. `None` lets botocore decide (`AWS_DEFAULT_REGION`, profile). The store never
            creates buckets, so the us-east-1 location-constraint pitfall of bucket creation does not apply.

        > Credentials (names of environment variables, never the secrets)

        access_key_id_env (`str` or `None`, *optional*, defaults to `None`):
            Name of the environment variable holding the access key id. `None` uses botocore's
            standard chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, profiles, instance roles).
            When set, `secret_access_key_env` must be set too and both variables must exist.
        secret_access_key_env (`str` or `None`, *optional*, defaults to `None`):
            Name of the environment variable holding the secret access key.
        session_token_env (`str` or `None`, *optional*, defaults to `None`):
            Name of the environment variable holding a session token (temporary credentials).

        > Request behaviour

        response_checksum_validation (`"auto"`, `"when_supported"` or `"when_required"`, *optional*, defaults to `"auto"`):
            botocore's response checksum validation. `"auto"` means `"when_required"` whenever an
            endpoint URL is in effect (non-AWS servers such as `rclone serve s3` return whole-object
            checksums on ranged reads, which fail botocore's default validation) and botocore's
            default on AWS.
        request_checksum_calculation (`"auto"`, `"when_supported"` or `"when_required"`, *optional*, defaults to `"auto"`):
            botocore's request checksum calculation, same `"auto"` rule.
        max_attempts (`int`, *optional*, defaults to `3`):
            Attempts per S3 request inside botocore (standard retry mode), first one included. Longer
            outages surface as transient errors (`is_transient_storage_error`) for the task's own retries.

        > One writer per run (`metareward.lease`)

        lease_ttl_s (`float`, *optional*, defaults to `120`):
            Time to live of a run's writer lease `{root}/{run}/_lease.json`: a lease not renewed for this
            long (its writer was killed) is taken over by the next writer.
        lease_renew_s (`float`, *optional*, defaults to `30`):
            How often the writer renews its lease; must be below `lease_ttl_s`.
    """

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={
            "description": "Where a run's artifacts and checkpoints are stored: a local folder or S3. Credentials are "
            "named by environment variables, never written here."
        },
    )

    root: str = Field(
        default="./runs", description="Storage root: a local folder (`./runs`) or `s3://bucket/prefix` (the bucket must exist)."
    )
    endpoint_url: str | None = Field(
        default=None, description="S3 endpoint of a non-AWS server; null: `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, else AWS."
    )
    region: str | None = Field(default=None, description="S3 region; null lets botocore decide (`AWS_DEFAULT_REGION`, profile).")
    access_key_id_env: str | None = Field(
        default=None, description="Name of the variable holding the access key id; null: botocore's standard credential chain."
    )
    secret_access_key_env: str | None = Field(default=None, description="Name of the variable holding the secret access key.")
    session_token_env: str | None = Field(
        default=None, description="Name of the variable holding a session token (temporary credentials)."
    )
    response_checksum_validation: ChecksumMode = Field(
        default="auto", description="botocore's response checksum validation; `auto`: `when_required` with an endpoint URL."
    )
    request_checksum_calculation: ChecksumMode = Field(
        default="auto", description="botocore's request checksum calculation; `auto`: `when_required` with an endpoint URL."
    )
    max_attempts: int = Field(
        default=3, ge=1, le=20, description="Attempts per S3 request inside botocore, the first one included."
    )
    lease_ttl_s: float = Field(
        default=120.0, gt=0, description="Seconds an unrenewed writer lease lives before the next writer may take it over."
    )
    lease_renew_s: float = Field(
        default=30.0, gt=0, description="Seconds between renewals of the writer lease; below `lease_ttl_s`."
    )

    @field_validator("root")
    @classmethod
    def _root_not_empty(cls, root: str) -> str:
        if not root.strip():
            raise ValueError("StorageConfig.root must not be empty (use a folder such as ./runs or s3://bucket/prefix)")
        return root

    @model_validator(mode="after")
    def _renew_before_expiry(self) -> "StorageConfig":
        if self.lease_renew_s >= self.lease_ttl_s:
            raise ValueError(
                f"storage.lease_renew_s ({self.lease_renew_s:g}) must be below storage.lease_ttl_s ({self.lease_ttl_s:g}): "
                "a lease must be renewed before it expires"
            )
        return self

    def resolved_endpoint_url(self) -> str | None:
        """The endpoint in effect: the config's, else `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`, else None (AWS)."""
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
