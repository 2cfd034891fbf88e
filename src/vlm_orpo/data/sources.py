"""Load preference rows from the hub, a local file or directory, or the bundled set; validate them; split them.

Rows stay in the Arrow dataset they came from (memory-mapped, images undecoded); `CanonicalRows` presents them
in one schema: idx, image, question (text or chat messages), chosen, rejected. Bad rows are skipped, counted by
reason and reported row by row, never silently dropped.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np

from vlm_orpo.config import BUNDLED
from vlm_orpo.data.validation import RowCheck, canonical_row, validate_rows
from vlm_orpo.errors import BadRow, DataError, first_line
from vlm_orpo.images import MAX_IMAGE_PIXELS

log = logging.getLogger(__name__)

CANONICAL = ("image", "question", "chosen", "rejected")
RLAIF_V_COLUMNS = {"image": "image", "question": "question", "chosen": "chosen", "rejected": "rejected"}
TRL_COLUMNS = {"image": "images", "question": "prompt", "chosen": "chosen", "rejected": "rejected"}
_NUMBERED_REJECTED = re.compile(r"rejected_(\d+)")
_FILE_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".arrow": "arrow"}


def resolve_image_path(value, base_dir: Path | None):
    """Relative image paths are relative to the data file's folder, wherever the process runs."""
    if base_dir is None:
        return value
    if isinstance(value, dict) and not value.get("bytes") and value.get("path"):
        value = value["path"]
    if isinstance(value, (str, os.PathLike)) and not Path(value).is_absolute():
        return str(Path(base_dir) / value)
    return value


@dataclass
class SkipReport:
    """Skipped rows by reason; every skip is logged once with its row number and idx."""

    reasons: Counter = field(default_factory=Counter)
    kept: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)  # kept rows with an answer cut to max_answer_tokens
    unscored: Counter = field(default_factory=Counter)  # held-out rows left out by an evaluation limit
    streamed: Counter = field(default_factory=Counter)  # rows read from a stream (data.streaming), all passes

    def skip(self, split: str, row: int, idx: Any, error: BadRow) -> None:
        self.reasons[error.reason] += 1
        log.warning("skipped %s row %d (idx %s): %s", split, row, idx, error)

    @property
    def total_skipped(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> str:
        notes = {split: [] for split in self.kept}
        for split, n in (+self.truncated).items():  # unary + drops zero counts
            notes.setdefault(split, []).append(f"{n} with an answer cut to max_answer_tokens")
        for split, n in (+self.unscored).items():
            notes.setdefault(split, []).append(f"{n} more held out but not scored: limit")
        for split, n in (+self.streamed).items():
            notes.setdefault(split, []).append(f"streamed: {n} rows read")
        kept = ", ".join(f"{split} {n}" + (f" ({'; '.join(notes[split])})" if notes[split] else "")
                         for split, n in self.kept.items())
        if not self.reasons:
            return f"data: kept {kept}; no rows skipped"
        by_reason = ", ".join(f"{reason}: {n}" for reason, n in self.reasons.most_common())
        return f"data: kept {kept}; skipped {self.total_skipped} ({by_reason})"


class CanonicalRows:
    """A view of selected rows of a source dataset in the canonical schema, decoded on access."""

    def __init__(self, dataset: datasets.Dataset, columns: dict[str, str], indices: list[int], base_dir=None):
        self.dataset = dataset
        self.columns = columns
        self.indices = indices
        self.base_dir = base_dir
        self.has_idx = "idx" in dataset.column_names

    def __len__(self) -> int:
        return len(self.indices)

    def raw(self, i: int) -> dict:
        return self.dataset[self.indices[i]]

    def __getitem__(self, i: int) -> dict:
        row = canonical_row(self.raw(i), self.columns, self.indices[i], self.has_idx)
        row["image"] = resolve_image_path(row["image"], self.base_dir)
        return row


def numbered_rejected_columns(column_names: list[str]) -> list[str]:
    """`rejected_1`, `rejected_2`, ... in number order: several rejected answers as columns."""
    numbered = [(int(m.group(1)), name) for name in column_names if (m := _NUMBERED_REJECTED.fullmatch(name))]
    return [name for _, name in sorted(numbered)]


def resolve_columns(column_names: list[str], mapping: dict[str, str | list[str]] | None) -> dict[str, str | list[str]]:
    """Canonical name -> source column: an explicit mapping first, then RLAIF-V's schema, then TRL's.

    `rejected` may name a list of columns, each holding one rejected answer; data with no `rejected` column but
    `rejected_1..k` columns gets those."""
    mapping = dict(mapping or {})
    unknown = set(mapping) - set(CANONICAL)
    if unknown:
        raise DataError(f"columns mapping has unknown keys {sorted(unknown)}; valid keys: {list(CANONICAL)}")
    if isinstance(mapping.get("rejected"), (list, tuple)):
        missing = [c for c in mapping["rejected"] if c not in column_names]
        if missing or not mapping["rejected"]:
            raise DataError(f"data.columns.rejected names columns {missing or '[]'} that the data lacks; it has "
                            f"{column_names}")
        rejected = list(mapping.pop("rejected"))
        return {**resolve_columns([*column_names, "rejected"], mapping), "rejected": rejected}
    if "rejected" not in mapping and "rejected" not in column_names and numbered_rejected_columns(column_names):
        return {**resolve_columns([*column_names, "rejected"], mapping),
                "rejected": numbered_rejected_columns(column_names)}
    for schema in (RLAIF_V_COLUMNS, TRL_COLUMNS):
        if all(mapping.get(k, v) in column_names for k, v in schema.items()):
            return {k: mapping.get(k, v) for k, v in schema.items()}
    resolved = {k: mapping.get(k, RLAIF_V_COLUMNS[k]) for k in CANONICAL}
    if "images" in column_names and "image" not in mapping:
        resolved["image"] = "images"
    if "prompt" in column_names and "question" not in mapping:
        resolved["question"] = "prompt"
    missing = [f"{k} (looked for column {v!r})" for k, v in resolved.items() if v not in column_names]
    raise DataError(
        f"missing column: {', '.join(missing)}; the data has columns {column_names}. "
        "Map them with data.columns, e.g. data.columns.question=prompt"
    )


# rows a parquet stream decodes at a time; datasets' default, a whole row group (thousands of rows of image bytes),
# made a stream's peak RSS grow with the file: 959 -> 1,950 MiB for 5k -> 20k rows (benchmarks/data_bench.py)
STREAM_BATCH_ROWS = 100


def _load_dataset(*args, streaming: bool = False, **kwargs):
    """datasets.load_dataset; a stream of parquet (local or hub) reads STREAM_BATCH_ROWS rows at a time."""
    if not streaming:
        return datasets.load_dataset(*args, **kwargs)
    try:
        return datasets.load_dataset(*args, streaming=True, batch_size=STREAM_BATCH_ROWS, **kwargs)
    except TypeError as exc:  # JSON, CSV and Arrow builders have no batch_size
        if "batch_size" not in str(exc):
            raise
        return datasets.load_dataset(*args, streaming=True, **kwargs)


def _load_local(path: Path, split: str, streaming: bool = False):
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            saved = datasets.load_from_disk(str(path))  # already Arrow on disk: a stream of it reads the same files
            if not streaming:
                return saved
            if isinstance(saved, datasets.DatasetDict):
                return datasets.IterableDatasetDict({name: d.to_iterable_dataset() for name, d in saved.items()})
            return saved.to_iterable_dataset()
        return _load_dataset(str(path), streaming=streaming)
    fmt = _FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"cannot read {path}: unsupported file type (use {', '.join(_FILE_FORMATS)})")
    return _load_dataset(fmt, data_files={split: str(path)}, streaming=streaming)


def local_source_path(source: str) -> Path | None:
    """The path of a local data source; None for a hub dataset name."""
    path = Path(source).expanduser()
    if path.exists() or path.suffix.lower() in _FILE_FORMATS or source.startswith((".", "/", "~")):
        return path
    return None


def load_source(source: str, split: str = "train", streaming: bool = False) -> tuple[datasets.Dataset, Path | None]:
    """One split of a dataset, with the folder that relative image paths are read from.

    A single file is one split: whatever split is asked for, it is the whole file. `streaming` gives a
    `datasets.IterableDataset` that reads rows as they are needed (a hub dataset is not downloaded first)."""
    if source == BUNDLED:
        from vlm_orpo.assets import ensure_assets

        files = ensure_assets()
        if split not in ("train", "validation"):
            raise DataError(f"the bundled data has no split {split!r}; it has ['train', 'validation']")
        source = files[split]
    path = local_source_path(source)
    try:
        if path is not None:
            if not path.exists():
                raise DataError(f"data path not found: {path}")
            loaded, base_dir = _load_local(path, split, streaming), (path if path.is_dir() else path.parent)
        else:
            loaded, base_dir = _load_dataset(source, streaming=streaming), None
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the one line, not the stack
        if path is not None and path.is_file() and _holds_no_rows(path):
            raise DataError(f"no rows in {path}") from None
        raise DataError(f"cannot load data {source!r}: {first_line(exc)}") from None
    if isinstance(loaded, datasets.DatasetDict | datasets.IterableDatasetDict):
        if split not in loaded:
            raise DataError(f"{source!r} has no split {split!r}; it has {list(loaded)}")
        loaded = loaded[split]
    if not streaming and len(loaded) == 0:
        where = str(path) if path is not None and path.is_file() else f"{source!r}, split {split!r}"
        raise DataError(f"no rows in {where}")
    return loaded, base_dir


def _holds_no_rows(path: Path) -> bool:
    """Whether a data file that `datasets` refused is simply empty (0 bytes, blank lines, a 0-row parquet)."""
    if path.stat().st_size == 0:
        return True
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows == 0
        except Exception:  # not parquet at all: the loader's own message says more
            return False
    with path.open("rb") as f:
        return not f.read(1 << 16).strip()


def undecoded_images(dataset: datasets.Dataset | datasets.IterableDataset, image_col: str):
    """The dataset with its image column left as bytes or paths: validation reads only the header, and a pair's
    image is decoded when it is encoded."""
    feature = (dataset.features or {}).get(image_col)
    if isinstance(feature, datasets.Image):
        return dataset.cast_column(image_col, datasets.Image(decode=False))
    if isinstance(feature, datasets.Sequence | datasets.List) and isinstance(feature.feature, datasets.Image):
        return dataset.cast_column(image_col, type(feature)(datasets.Image(decode=False)))
    return dataset


def select_rows(
    dataset: datasets.Dataset,
    columns: dict[str, str],
    split_name: str,
    report: SkipReport,
    base_dir: Path | None = None,
    positions: list[int] | None = None,
    check_tokens: Callable[[dict, tuple[int, int]], bool] | None = None,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
    check_key: str | None = None,
    num_proc: int | None = None,
) -> CanonicalRows:
    """Validate rows (in parallel, or from the cache of an earlier run: see `validation`) and keep the good ones.

    `check_tokens(row, (height, width))` (the encoder's, with `check_key` its cache key) raises BadRow for a row
    the model cannot take and returns whether an answer will be cut, which is counted."""
    undecoded = undecoded_images(dataset, columns["image"])
    check = RowCheck(undecoded, columns, base_dir, max_pixels, check_tokens, check_key)
    positions = list(positions) if positions is not None else list(range(len(undecoded)))
    kept = []
    for outcome in validate_rows(check, positions, num_proc):
        if outcome.reason is not None:
            report.skip(split_name, outcome.row, outcome.idx, BadRow(outcome.reason, outcome.detail))
            continue
        report.truncated[split_name] += outcome.truncated
        kept.append(outcome.row)
    report.kept[split_name] = len(kept)
    return CanonicalRows(undecoded, columns, kept, base_dir)


def matching_rows(dataset: datasets.Dataset, where: dict[str, Any]) -> list[int]:
    """Row numbers whose `column` value is one of the allowed values, for every column in `where`."""
    keep = np.ones(len(dataset), dtype=bool)
    for column, allowed in where.items():
        if column not in dataset.column_names:
            raise DataError(f"data.where names column {column!r}, which the data lacks; it has {dataset.column_names}")
        allowed = set(allowed) if isinstance(allowed, (list, tuple, set)) else {allowed}
        values = dataset.select_columns([column])[column]
        keep &= np.fromiter((v in allowed for v in values), dtype=bool, count=len(dataset))
    return np.flatnonzero(keep).tolist()


@dataclass
class PreparedData:
    train: CanonicalRows | None
    validation: CanonicalRows | None
    report: SkipReport


def prepare_data(
    source: str,
    *,
    train_split: str = "train",
    want_train: bool = True,
    validation_split: str | None = None,
    validation_fraction: float = 0.0,
    subset_fraction: float = 1.0,
    limit: int | None = None,  # at most this many validation rows (evaluation)
    seed: int = 42,
    columns: dict[str, str] | None = None,
    where: dict[str, Any] | None = None,
    check_tokens: Callable | None = None,
    check_key: str | None = None,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    num_proc: int | None = None,
) -> PreparedData:
    """Load, subset, split and validate. A named validation split wins over validation_fraction.

    With want_train=False (evaluation) the train split is still read when validation is a fraction of it,
    but only the validation rows are validated. `limit` scores fewer held-out rows; it never gives the rest
    to training, so the train set does not depend on it.
    """
    path = local_source_path(source) if source != BUNDLED else None
    if want_train and validation_split and path is not None and path.is_file():
        raise DataError(
            f"{source} is one file, so it has no separate {validation_split!r} split; "
            "hold out part of it with data.validation_fraction"
        )
    report = SkipReport()

    def pick(dataset: datasets.Dataset, fraction: float) -> list[int]:
        positions = np.array(matching_rows(dataset, where or {}), dtype=np.int64)
        if fraction < 1:
            positions = np.random.default_rng(seed).permutation(positions)[: max(1, round(len(positions) * fraction))]
        return sorted(positions.tolist())

    def validated(dataset, name, base_dir, positions):
        cols = resolve_columns(dataset.column_names, columns)
        return select_rows(
            dataset, cols, name, report, base_dir, positions, check_tokens, max_image_pixels, check_key, num_proc
        )

    def limited(positions: list[int], name: str) -> list[int]:
        if limit is not None and len(positions) > limit:
            report.unscored[name] = len(positions) - limit
            return positions[:limit]
        return positions

    train = validation = None
    if want_train or (validation_split is None and validation_fraction > 0):
        data, base_dir = load_source(source, train_split)
        positions = pick(data, subset_fraction)
        if validation_split is None and validation_fraction > 0:
            n_val = max(1, round(len(positions) * validation_fraction))
            shuffled = np.random.default_rng(seed + 1).permutation(positions).tolist()
            val_positions, positions = limited(sorted(shuffled[:n_val]), "validation"), sorted(shuffled[n_val:])
            validation = validated(data, "validation", base_dir, val_positions)
        if want_train:
            train = validated(data, train_split, base_dir, positions)
    if validation_split:
        data, base_dir = load_source(source, validation_split)
        validation = validated(data, validation_split, base_dir, limited(pick(data, 1.0), validation_split))
    return PreparedData(train=train, validation=validation, report=report)
