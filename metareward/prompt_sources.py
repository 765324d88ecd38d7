"""Prompt pools and the per-iteration prompt sample.

Sources (`load_prompt_pool`):
- `"embedded"` (or `None`): the prompt set shipped in the package, `metareward/data/prompts.jsonl`
  (141 short, self-contained instructions: factual questions, how-tos, writing, rewriting, math and
  reasoning word problems, coding, advice, summarising a given text, classification, explaining,
  brainstorming, comparing, translating; one JSON object per line with `prompt_id`, `prompt`,
  `category`).
- a user's file, local or in object storage (`s3://...`), chosen by its extension: Parquet
  (`.parquet`, `.pq`), JSON Lines (`.jsonl`, `.ndjson`) or CSV (`.csv`). It needs a `prompt`
  column of non-empty strings; `prompt_id` is its own column when present (as text), else
  `metareward.hashing.prompt_id_of(prompt)`. Other columns are ignored.

Sampling (`sample_prompts`, `heldout_prompts`), all from one `seed`, independent of row order:
- The pool is split once: each prompt gets the key `tie_break_key(seed, "holdout/" + prompt_id)`;
  the `ceil(holdout_fraction * n)` prompts with the smallest keys are the held-out evaluation
  slice, never sampled for training. The rest is the training pool.
- Without replacement (default): the training pool is walked in passes. Pass p orders the pool by
  `tie_break_key(seed, f"train/{p}/{prompt_id}")`; iterations 1, 2, ... take consecutive slices of
  their sizes, so iterations see disjoint prompts while the pool lasts. When the next iteration's
  slice does not fit in what is left of the current pass, the rest of the pass is skipped and that
  iteration starts the next pass, a fresh order: prompts then repeat across iterations (never
  within one), and the sample's `attrs["pass"]` says which pass it came from (0 = the first).
- With replacement: iteration i takes the first `per_iteration` prompts of the order
  `tie_break_key(seed, f"iteration/{i}/{prompt_id}")`, independently of other iterations.
- An iteration asking for more prompts than the training pool holds is an error.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from importlib import resources
from typing import Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from metareward.hashing import tie_break_keys
from metareward.schema import PROMPT, PROMPT_ID, prepare_prompts
from metareward.storage import StorageConfig, Store

EMBEDDED = "embedded"
EMBEDDED_RESOURCE = "prompts.jsonl"
_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


class PromptSourceError(ValueError):
    """A prompt file that cannot be used; the message names the file and the problem."""


def load_prompt_pool(source: str | None = EMBEDDED, store: Store | None = None) -> pd.DataFrame:
    """The prompt pool as a DataFrame with columns `prompt_id`, `prompt` (str), in file order.

    `source`: `"embedded"`/`None`, or a path or URL of a Parquet, JSONL or CSV file. An `s3://`
    source is read through `store` when it is an S3 store (its endpoint and credentials), else
    through an S3 store built from the environment. Raises `PromptSourceError` naming the file for
    an unknown extension, unreadable content, a missing `prompt` column, empty or non-string
    prompts (with their row numbers, counted from 1 without the CSV header), empty `prompt_id`s
    and duplicate `prompt_id`s.
    """
    name, file_format, data = _source_bytes(source, store)
    return _validated(parse_table(data, file_format, name), name)


def source_digest(source: str | None = EMBEDDED, store: Store | None = None) -> str:
    """sha256 of the prompt source's bytes: what the sampled prompts depend on besides the
    settings, so a file edited in place is a new input to `sample_prompts`."""
    return hashlib.sha256(_source_bytes(source, store)[2]).hexdigest()


def _source_bytes(source: str | None, store: Store | None) -> tuple[str, str, bytes]:
    """(name in messages, file format, content) of a prompt source."""
    if source is None or source == EMBEDDED:
        name = f"embedded prompt set (metareward/data/{EMBEDDED_RESOURCE})"
        return name, "jsonl", resources.files("metareward").joinpath("data", EMBEDDED_RESOURCE).read_bytes()
    if not isinstance(source, str) or not source.strip():
        raise PromptSourceError(f"prompt source must be 'embedded' or a file path/URL, got {source!r}")
    extension = os.path.splitext(source.split("?", 1)[0])[1].lower()
    file_format = _FORMATS.get(extension)
    if file_format is None:
        raise PromptSourceError(
            f"prompt file {source}: unsupported extension {extension or '(none)'!r}; "
            "use .parquet, .jsonl (or .ndjson) or .csv"
        )
    return f"prompt file {source}", file_format, _read_source(source, store)


def _read_source(source: str, store: Store | None) -> bytes:
    protocol = source.split("://", 1)[0].lower() if "://" in source else "file"
    if protocol in ("file", "local"):
        path = source.split("://", 1)[1] if "://" in source else source
        try:
            with open(os.path.expanduser(path), "rb") as handle:
                return handle.read()
        except FileNotFoundError as exc:
            raise PromptSourceError(f"prompt file {source} does not exist") from exc
        except IsADirectoryError as exc:
            raise PromptSourceError(f"prompt file {source} is a folder, not a file") from exc
    if protocol in ("s3", "s3a"):
        if store is None or store.protocol != "s3":
            bucket = source.split("://", 1)[1].split("/", 1)[0]
            store = Store(StorageConfig(root=f"s3://{bucket}"))
        try:
            return store.read_bytes(source)
        except FileNotFoundError as exc:
            raise PromptSourceError(f"prompt file {source} does not exist") from exc
    raise PromptSourceError(f"prompt file {source}: protocol {protocol!r} is not supported; use a local path or s3://")


def parse_table(data: bytes, file_format: str, name: str, error: type[ValueError] = PromptSourceError) -> pd.DataFrame:
    """The table in `data` (`parquet`, `jsonl` or `csv`; JSONL values kept as parsed); a file that
    does not parse raises `error` naming `name` and, for JSONL, the line."""
    if file_format == "parquet":
        try:
            return pq.read_table(io.BytesIO(data)).to_pandas()
        except (pa.ArrowException, OSError) as exc:
            raise error(f"{name} is not a readable Parquet file: {exc}") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{name} is not UTF-8 text: {exc}") from exc
    lines: list[int] = []  # the file line of each row, for messages a person can find in an editor
    if file_format == "jsonl":
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{name}: line {line_number}, column {exc.colno} is not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise error(f"{name}: line {line_number} is a JSON {type(record).__name__}, not an object")
            records.append(record)
            lines.append(line_number)
        # dtype=object keeps the values exactly as parsed (no numeric coercion of ids or prompts)
        table = pd.DataFrame.from_records(records).astype(object) if records else pd.DataFrame()
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = []
        try:
            for row in reader:
                rows.append(row)
                lines.append(reader.line_num)  # the row's last line (its only one unless a field spans lines)
        except csv.Error as exc:
            raise error(f"{name} is not readable CSV: {exc}") from exc
        for row_number, row in enumerate(rows, start=1):
            if None in row:
                raise error(f"{name}: {describe_rows([row_number], lines)} has more fields than the header")
        table = pd.DataFrame(rows, dtype=object) if rows else pd.DataFrame(columns=_csv_header(text))
    table.attrs["lines"] = lines
    return table


def describe_rows(rows: Sequence[int], lines: Sequence[int] | None = None, limit: int = 10) -> str:
    """`row 2 (line 3), row 5 (line 7)` for rows counted from 1 (the header excluded); the line is
    where the row sits in a JSONL or CSV file (`parse_table`'s `attrs["lines"]`), omitted for Parquet."""
    shown = [f"row {row}" + (f" (line {lines[row - 1]})" if lines else "") for row in rows[:limit]]
    return ", ".join(shown) + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def _csv_header(text: str) -> list[str]:
    first = next(csv.reader(io.StringIO(text)), [])
    return list(first)


def _validated(table: pd.DataFrame, name: str) -> pd.DataFrame:
    lines = table.attrs.get("lines")
    if len(table) == 0 and len(table.columns) == 0:
        raise PromptSourceError(f"{name} holds no prompts (no rows)")
    if PROMPT not in table.columns:
        columns = ", ".join(repr(column) for column in table.columns) or "no columns"
        raise PromptSourceError(f"{name}: no {PROMPT!r} column (it has {columns})")
    if len(table) == 0:
        raise PromptSourceError(f"{name} holds no prompts")
    table = table.reset_index(drop=True)
    bad = [index + 1 for index, value in enumerate(table[PROMPT]) if not isinstance(value, str) or not value.strip()]
    if bad:
        raise PromptSourceError(
            f"{name}: column {PROMPT!r} is empty or not text at {describe_rows(bad, lines)} "
            f"({len(bad)} of {len(table)} rows; rows counted from 1, header excluded)"
        )
    if PROMPT_ID in table.columns:
        ids = table[PROMPT_ID]
        bad_ids = [index + 1 for index, value in enumerate(ids) if _is_missing(value) or not str(value).strip()]
        if bad_ids:
            raise PromptSourceError(f"{name}: column {PROMPT_ID!r} is empty at {describe_rows(bad_ids, lines)}")
        duplicated = ids.astype(str).duplicated(keep=False)
        if duplicated.any():
            value = ids.astype(str)[duplicated].iloc[0]
            rows = [index + 1 for index in duplicated[ids.astype(str) == value].index]
            raise PromptSourceError(
                f"{name}: column {PROMPT_ID!r} holds {value!r} at {describe_rows(rows, lines)} "
                f"({int(duplicated.sum())} rows share a prompt_id)"
            )
    else:
        texts = table[PROMPT]
        duplicated = texts.duplicated(keep=False)
        if duplicated.any():
            value = texts[duplicated].iloc[0]
            rows = [index + 1 for index in texts.index[texts == value]]
            raise PromptSourceError(
                f"{name}: column {PROMPT!r} holds {value[:60]!r} at {describe_rows(rows, lines)}; without a "
                "prompt_id column identical prompts get the same id, so remove the duplicates"
            )
    prepared = prepare_prompts(table[[c for c in (PROMPT_ID, PROMPT) if c in table.columns]], name=name)
    out = prepared[[PROMPT_ID, PROMPT]].astype({PROMPT_ID: str, PROMPT: str})
    return out.reset_index(drop=True)


def _is_missing(value: object) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------
# sampling


def heldout_prompts(pool: pd.DataFrame, seed: int, holdout_fraction: float) -> pd.DataFrame:
    """The held-out evaluation slice of `pool` (never sampled for training), in its seeded order."""
    heldout, _ = _split(pool, seed, holdout_fraction)
    return heldout


def sample_prompts(
    pool: pd.DataFrame,
    iteration: int,
    per_iteration: int,
    seed: int,
    holdout_fraction: float,
    without_replacement: bool = True,
    earlier_sizes: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Iteration `iteration`'s prompts (columns `prompt_id`, `prompt`), deterministic for the
    same pool, seed and sizes whatever the pool's row order.

    `iteration` counts from 1 (iteration 1 trains M0 into M1). `earlier_sizes` are the sample sizes
    of iterations 1 .. iteration-1 when they differ from `per_iteration` (per-iteration overrides);
    `None` means they were all `per_iteration`. The rule when the pool runs out is in the module
    docstring; `attrs["pass"]` holds the pass number of a without-replacement sample.
    """
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 1:
        raise ValueError(f"iteration must be an integer >= 1 (iteration 1 trains M0 into M1), got {iteration!r}")
    sizes = list(earlier_sizes) if earlier_sizes is not None else [per_iteration] * (iteration - 1)
    if len(sizes) != iteration - 1:
        raise ValueError(f"earlier_sizes must give the sizes of iterations 1..{iteration - 1}, got {len(sizes)} values")
    sizes.append(per_iteration)
    _, train = _split(pool, seed, holdout_fraction)
    for number, size in enumerate(sizes, start=1):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"prompts per iteration must be an integer >= 1, got {size!r} for iteration {number}")
        if size > len(train):
            raise ValueError(
                f"iteration {number} asks for {size} prompts but the training pool holds {len(train)} "
                f"({len(pool)} prompts minus the held-out slice of {len(pool) - len(train)})"
            )
    ids = train[PROMPT_ID].tolist()
    if not without_replacement:
        order = _seeded_order(ids, seed, f"iteration/{iteration}/")
        sample = train.iloc[order[:per_iteration]].reset_index(drop=True)
        return sample
    pass_number, cursor = 0, 0
    for size in sizes[:-1]:
        if cursor + size > len(train):
            pass_number, cursor = pass_number + 1, 0
        cursor += size
    if cursor + per_iteration > len(train):
        pass_number, cursor = pass_number + 1, 0
    order = _seeded_order(ids, seed, f"train/{pass_number}/")
    sample = train.iloc[order[cursor : cursor + per_iteration]].reset_index(drop=True)
    sample.attrs["pass"] = pass_number
    return sample


def _split(pool: pd.DataFrame, seed: int, holdout_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(held-out slice, training pool), each in the seeded order of its own key."""
    if not isinstance(pool, pd.DataFrame) or PROMPT_ID not in pool.columns or PROMPT not in pool.columns:
        raise ValueError("pool must be a DataFrame with columns 'prompt_id' and 'prompt' (see load_prompt_pool)")
    if not isinstance(holdout_fraction, (int, float)) or not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction!r}")
    if pool[PROMPT_ID].duplicated().any():
        duplicate = pool.loc[pool[PROMPT_ID].duplicated(), PROMPT_ID].iloc[0]
        raise ValueError(f"pool: prompt_id {duplicate!r} occurs more than once")
    if len(pool) == 0:
        raise ValueError("pool holds no prompts")
    table = pool[[PROMPT_ID, PROMPT]].reset_index(drop=True)
    order = _seeded_order(table[PROMPT_ID].tolist(), seed, "holdout/")
    held = math.ceil(holdout_fraction * len(table)) if holdout_fraction > 0 else 0
    if held >= len(table):
        raise ValueError(
            f"holdout_fraction {holdout_fraction} of {len(table)} prompts leaves no prompt for training"
        )
    heldout = table.iloc[order[:held]].reset_index(drop=True)
    train = table.iloc[order[held:]].reset_index(drop=True)
    return heldout, train


def _seeded_order(ids: list[str], seed: int, salt: str) -> list[int]:
    """Positions of `ids` sorted by (seeded key of salt+id, id): a permutation that depends only on
    the seed, the salt and the set of ids."""
    keys = tie_break_keys(seed, (salt + str(prompt_id) for prompt_id in ids))
    return sorted(range(len(ids)), key=lambda position: (int(keys[position]), str(ids[position])))
