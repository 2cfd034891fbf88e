"""Row validation, in parallel and once: its outcome is remembered beside the dataset's own cache.

Validating a row reads its image header, checks its fields and renders and counts its tokens, a few ms a row:
minutes for RLAIF-V's 83k rows, at every start. Rows are split over `num_proc` forked workers (fork: the
workers share the parent's tokenizer and dataset instead of loading them again), and the outcome (kept rows,
skips with their reason, cut answers) is stored as JSON next to the dataset's Arrow files, under a key made of
everything that decides it: the data's fingerprint, the columns, the rows asked for, the image cap and the
validator's own key (tokenizer, chat template, length limits). Change any of them and the rows are validated
again; the skip report is the same either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import datasets

from vlm_orpo.errors import BadRow
from vlm_orpo.images import MAX_IMAGE_PIXELS, open_image

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when what a row's validation checks changes
PARALLEL_FROM_ROWS = 512  # below this, starting workers costs more than it saves


def _text(value, name: str = "answer") -> str | None:
    """An answer as plain text: a string, a number, or TRL's chat form (a list of messages with text content)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # e.g. a CSV column of counts
        # a CSV column holding 3 and 2.5 is read as floats: the answer "3" must not come back as "3.0"
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise BadRow(f"bad {name}", f"a {type(value).__name__}, not text or chat messages")
    parts = []
    for message in value:
        content = message.get("content") if isinstance(message, dict) else message
        if content is None:
            continue
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, (list, tuple)):
            parts.extend(str(c.get("text") or "") for c in content if isinstance(c, dict) and c.get("type") == "text")
        else:
            raise BadRow(f"bad {name}", f"message content is a {type(content).__name__}")
    return "".join(parts)


def _is_chat(value) -> bool:
    """TRL's chat form of one answer: a message mapping, or a list of them."""
    return isinstance(value, dict) or (
        isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(m, dict) for m in value)
    )


def _rejected(value) -> str | list[str] | None:
    """One rejected answer (text or chat form) as text, or several (a list of them) as a list of texts.

    An empty list, or an entry that is neither text nor chat messages, is a bad row, never guessed at."""
    if not isinstance(value, (list, tuple)) or _is_chat(value):
        return _text(value, "rejected")
    if not value:
        raise BadRow("empty rejected", "an empty list of rejected answers")
    bad = [f"entry {i} is a {type(v).__name__}" for i, v in enumerate(value) if not (isinstance(v, str) or _is_chat(v))]
    if bad:
        raise BadRow("bad rejected", "; ".join(bad) + ": each rejected answer must be text or chat messages")
    return [_text(v, "rejected") for v in value]


def rejected_answers(row: dict) -> list[str]:
    """A canonical row's rejected answers: one for the usual schemas, or several for list-valued `rejected`."""
    rejected = row["rejected"]
    return list(rejected) if isinstance(rejected, list) else [rejected]


def _question(value):
    """Plain question text, or chat messages kept as given (the encoder formats both)."""
    if isinstance(value, list) and value and isinstance(value[0], dict) and "role" in value[0]:
        return value
    return _text(value, "question")


def canonical_row(raw: dict, columns: dict[str, str | list[str]], row_number: int, has_idx: bool) -> dict:
    """The row in the canonical schema. `columns["rejected"]` may name several columns (`rejected_1..k`): each
    holds one rejected answer, and a null one is an answer the row does not have."""
    image = raw[columns["image"]]
    if isinstance(image, list):  # TRL's `images`: we train on exactly one image per pair
        if len(image) != 1:
            raise BadRow("missing image" if not image else "more than one image", f"{len(image)} images")
        image = image[0]
    return {
        "idx": raw["idx"] if has_idx else row_number,
        "image": image,
        "question": _question(raw[columns["question"]]),
        "chosen": _text(raw[columns["chosen"]], "chosen"),
        "rejected": _rejected(_answer_columns(raw, columns["rejected"]) if isinstance(columns["rejected"], list)
                              else raw[columns["rejected"]]),
    }


def _answer_columns(raw: dict, names: list[str]) -> list:
    """The non-null values of several answer columns (a table pads a row with fewer answers with nulls)."""
    answers = [raw[name] for name in names if raw[name] is not None]
    if not answers:
        raise BadRow("missing rejected", f"columns {', '.join(names)} are all null")
    return answers


def check_row(row: dict, base_dir: Path | None, max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """Raise BadRow for a row we cannot train on; return the image's (height, width)."""
    for name, value in (("question", row["question"]), ("chosen", row["chosen"]),
                        *(("rejected", answer) for answer in rejected_answers(row))):
        if value is None:
            raise BadRow(f"missing {name}")
        if isinstance(value, str) and not value.strip():
            raise BadRow(f"empty {name}")
    if any(row["chosen"].strip() == answer.strip() for answer in rejected_answers(row)):
        raise BadRow("chosen identical to rejected")
    if row["image"] is None:
        raise BadRow("missing image")
    image = open_image(row["image"], base_dir, max_pixels)
    return image.height, image.width


@dataclass
class RowOutcome:
    row: int
    idx: Any
    reason: str | None = None  # None: kept
    detail: str = ""
    truncated: bool = False  # kept, with an answer cut to max_answer_tokens


@dataclass
class RowCheck:
    """What validating one row needs; `check_tokens` and `key` come from the encoder (None: fields and image only)."""

    dataset: datasets.Dataset | None  # images undecoded; None for a stream (rows come to `outcome`)
    columns: dict[str, str]
    base_dir: Path | None
    max_pixels: int | None
    check_tokens: Callable[[dict, tuple[int, int]], bool] | None = None
    key: str | None = None  # the validator's cache key; None: the outcome is not cached

    def __call__(self, row_number: int) -> RowOutcome:
        return self.outcome(self.dataset[row_number], row_number, "idx" in self.dataset.column_names)

    def outcome(self, raw: dict, row_number: int, has_idx: bool) -> RowOutcome:
        """One raw row's outcome: of a dataset's row here, of a streamed row in `data.streaming`."""
        idx = raw["idx"] if has_idx else row_number
        try:
            row = canonical_row(raw, self.columns, row_number, has_idx)
            size = check_row(row, self.base_dir, self.max_pixels)
            truncated = bool(self.check_tokens(row, size)) if self.check_tokens is not None else False
        except BadRow as err:
            return RowOutcome(row_number, idx, err.reason, err.detail)
        return RowOutcome(row_number, idx, truncated=truncated)


_CHECK: RowCheck | None = None  # the forked workers' copy (set before the fork, so nothing is pickled)


def _check_chunk(positions: list[int]) -> list[RowOutcome]:
    return [_CHECK(p) for p in positions]


def validate_rows(check: RowCheck, positions: list[int], num_proc: int | None = None) -> list[RowOutcome]:
    """One outcome per position, in order: from the cache when the key matches, else computed (and stored)."""
    path = _cache_path(check, positions)
    if path is not None and path.is_file():
        try:
            outcomes = [RowOutcome(**o) for o in json.loads(path.read_text())["outcomes"]]
            log.info("row validation read from %s", path)
            return outcomes
        except (OSError, ValueError, TypeError, KeyError):  # a torn or foreign file: validate again
            log.warning("ignoring unreadable validation cache %s", path)
    outcomes = _compute(check, positions, num_proc or os.cpu_count() or 1)
    if path is not None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"outcomes": [asdict(o) for o in outcomes]}))
            os.replace(tmp, path)  # atomic: concurrent runs never read half a file
        except (OSError, TypeError) as exc:  # a read-only cache or an idx JSON cannot hold: validate next time
            tmp.unlink(missing_ok=True)
            log.warning("row validation not cached (%s)", exc)
    return outcomes


def _compute(check: RowCheck, positions: list[int], num_proc: int) -> list[RowOutcome]:
    global _CHECK
    if num_proc <= 1 or len(positions) < PARALLEL_FROM_ROWS or "fork" not in multiprocessing.get_all_start_methods():
        return [check(p) for p in positions]
    chunk = -(-len(positions) // (num_proc * 4))  # a few chunks per worker, so a slow chunk does not hold the rest
    chunks = [positions[i : i + chunk] for i in range(0, len(positions), chunk)]
    _CHECK = check
    try:
        with multiprocessing.get_context("fork").Pool(num_proc) as pool:
            return [outcome for part in pool.map(_check_chunk, chunks) for outcome in part]
    finally:
        _CHECK = None


def _cache_path(check: RowCheck, positions: list[int]) -> Path | None:
    """Where this validation's outcome is stored, or None when it cannot be keyed (in-memory data, no key)."""
    files = check.dataset.cache_files
    if not files or (check.check_tokens is not None and check.key is None):
        return None
    key = json.dumps([
        CACHE_VERSION, check.dataset._fingerprint, check.columns, str(check.base_dir), check.max_pixels, check.key,
        hashlib.sha256(json.dumps(positions).encode()).hexdigest(),
    ])
    return Path(files[0]["filename"]).parent / f"vlm_orpo_rows-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
