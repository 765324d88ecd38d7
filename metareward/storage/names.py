"""Names under the storage root: run names and path segments that cannot leave the root, and the
temporary names of unfinished writes."""

from __future__ import annotations

import os
import re
import uuid

# ----------------------------------------------------------------------------------------------
# names and URIs

MANIFEST_FILE = "manifest.json"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TEMP_MARK = ".tmp-"


def slug(text: str) -> str:
    """`text` as a Prefect key (artifact keys, pause keys): lowercase letters, digits and single
    dashes, every other character a dash."""
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")


def validate_run_name(name: str) -> str:
    """Return `name` if it is a safe run name, else raise ValueError saying what is wrong.

    A run name becomes one path segment under the storage root, so anything that could leave the
    root or hide a file is refused: empty names, `..`, `/` and `\\`, absolute paths, control
    characters and leading dots. Allowed: letters, digits, `.`, `_`, `-`, starting with a letter or
    digit, at most 128 characters.
    """
    return _validate_segment(name, "run name")


def _validate_segment(name: str, what: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a string, got {type(name).__name__}: {name!r}")
    if name == "":
        raise ValueError(f"{what} must not be empty")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise ValueError(f"{what} {name!r} contains control characters")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise ValueError(f"{what} {name!r} is an absolute path; give a plain name such as 'demo'")
    if "/" in name or "\\" in name:
        raise ValueError(f"{what} {name!r} contains a path separator ('/' or '\\'); give a plain name such as 'demo'")
    if ".." in name:
        raise ValueError(f"{what} {name!r} contains '..'")
    if name.startswith("."):
        raise ValueError(f"{what} {name!r} starts with a dot")
    if not _SAFE_NAME.match(name):
        raise ValueError(
            f"{what} {name!r} has characters outside letters, digits, '.', '_' and '-' (or is longer than 128)"
        )
    return name


def _is_temp_name(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name


def _temp_name(name: str) -> str:
    return f".{name}{TEMP_MARK}{uuid.uuid4().hex}"
