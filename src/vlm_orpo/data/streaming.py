"""Train on a dataset read as a stream (`data.streaming: true`): the whole dataset is never downloaded first.

Without streaming, `datasets` downloads every shard of a hub dataset (RLAIF-V: ~13 GB) before the first step.
Streamed, rows are read as training needs them, and what a length would have given is replaced:

- Which rows: a row's place in `subset_fraction` and in the held-out `validation_fraction` follows from a hash
  of its key (`idx`, else its question and chosen answer) and `data.seed`, not from a permutation of a length
  the stream lacks: the same rows on every pass, process and resume. (So the subset differs from the one the
  same fraction picks without streaming.)
- Held out: the validation pairs are read once at the start, at most `data.eval_limit` of them (required), and
  kept in memory, so every evaluation scores the same pairs.
- Training: each process reads its own part of the stream (`split_dataset_by_node`), each dataloader worker its
  own shards of it (datasets' own split), through a shuffle buffer of `data.shuffle_buffer` rows. Rows are
  validated as they arrive; a bad one is skipped, logged and counted as without streaming. The stream never
  ends: after a pass the next one starts, reshuffled, so a run lasts `training.max_steps` steps and every
  process takes the same number of batches (a process whose part ran out first would hang the others).
- Resume: every pair carries its reader's state (pass, rows read, counts); the trainer keeps the state of the
  last pair it trained and writes it into each checkpoint, and a resumed reader passes over the rows it had
  read without validating or encoding them: no pair is trained twice or left out, and the counts go on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets.distributed import split_dataset_by_node

from vlm_orpo.data.packing import EncodedPair, PairDataset, PairEncoder
from vlm_orpo.data.sources import (
    CanonicalRows,
    SkipReport,
    load_source,
    resolve_columns,
    resolve_image_path,
    undecoded_images,
)
from vlm_orpo.data.validation import RowCheck, canonical_row
from vlm_orpo.errors import BadRow, ConfigError, DataError

log = logging.getLogger(__name__)

STATE_FILE = "stream_state-rank{rank}.json"  # one per process, in every checkpoint


def _bucket(key: str, seed: int, salt: str) -> float:
    """A row's uniform number in [0, 1) for one selection: the same for the same row wherever it is read."""
    digest = hashlib.sha256(f"{seed}/{salt}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class StreamRows:
    """A stream of raw rows (images undecoded) and the rules that pick and check them."""

    stream: datasets.IterableDataset
    columns: dict[str, Any]
    check: RowCheck
    has_idx: bool
    where: dict[str, Any]
    subset_fraction: float
    held_out_fraction: float  # rows under it are held out of training (validation_fraction of this split)
    seed: int

    def key(self, raw: dict) -> str:
        if self.has_idx:
            return json.dumps(raw["idx"], default=str)
        return json.dumps([raw[self.columns["question"]], raw[self.columns["chosen"]]], default=str)

    def selected(self, raw: dict, held_out: bool) -> bool:
        """Whether the row belongs to the training rows (held_out=False) or the held-out ones."""
        for column, allowed in self.where.items():
            if raw[column] not in (set(allowed) if isinstance(allowed, (list, tuple, set)) else {allowed}):
                return False
        key = self.key(raw)
        if self.subset_fraction < 1 and _bucket(key, self.seed, "subset") >= self.subset_fraction:
            return False
        return (self.held_out_fraction > 0 and _bucket(key, self.seed, "held-out") < self.held_out_fraction) == held_out

    def canonical(self, raw: dict, position: int) -> dict:
        row = canonical_row(raw, self.columns, position, self.has_idx)
        row["image"] = resolve_image_path(row["image"], self.check.base_dir)
        return row


def open_rows(data_cfg, split: str, held_out_fraction: float, encoder: PairEncoder) -> StreamRows:
    """The stream of one split with the run's columns, filters and validator."""
    stream, base_dir = load_source(data_cfg.source, split, streaming=True)
    names = stream.column_names
    if names is None:  # a JSON or CSV stream declares no features: its first row names the columns
        first = next(iter(stream.take(1)), None)
        if first is None:
            raise DataError(f"no rows in {data_cfg.source!r}, split {split!r}")
        names = list(first)
    columns = resolve_columns(names, data_cfg.columns)
    for column in data_cfg.where:
        if column not in names:
            raise DataError(f"data.where names column {column!r}, which the data lacks; it has {names}")
    check = RowCheck(None, columns, base_dir, data_cfg.max_image_pixels, encoder.check, encoder.cache_key)
    return StreamRows(undecoded_images(stream, columns["image"]), columns, check, "idx" in names, data_cfg.where,
                      data_cfg.subset_fraction, held_out_fraction, data_cfg.seed)


def held_out_pairs(rows: StreamRows, name: str, limit: int, report: SkipReport) -> CanonicalRows | None:
    """The first `limit` good held-out rows of the stream, read once, in stream order, and kept in memory."""
    kept = []
    for position, raw in enumerate(rows.stream):
        if not rows.selected(raw, held_out=True):
            continue
        outcome = rows.check.outcome(raw, position, rows.has_idx)
        if outcome.reason is not None:
            report.skip(name, position, outcome.idx, BadRow(outcome.reason, outcome.detail))
            continue
        report.truncated[name] += outcome.truncated
        kept.append({**raw, "idx": outcome.idx})
        if len(kept) == limit:
            break
    report.kept[name] = len(kept)
    if not kept:
        return None
    return CanonicalRows(datasets.Dataset.from_list(kept), rows.columns, list(range(len(kept))), rows.check.base_dir)


def describe_stream(shuffle_buffer: int) -> str:
    shuffle = f"shuffle buffer {shuffle_buffer} rows" if shuffle_buffer else "not shuffled"
    return f"streamed ({shuffle}; no length: training.max_steps ends the run)"


@dataclass
class ReaderState:
    """Where one reader (a process's dataloader worker) is in the stream, and what it has found so far."""

    epoch: int = 0  # the pass over the data
    position: int = 0  # rows of this pass read, up to and including the last pair handed out
    read: int = 0  # rows read over all passes
    kept: int = 0
    truncated: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def snapshot(self) -> ReaderState:
        return dataclasses.replace(self, skipped=dict(self.skipped))


class StreamedPairs(torch.utils.data.IterableDataset):
    """The training pairs of a stream, encoded as they are read; endless (see the module's docstring)."""

    def __init__(self, rows: StreamRows, encoder: PairEncoder, shuffle_buffer: int, process_index: int = 0,
                 num_processes: int = 1):
        self.rows = rows
        self.encoder = encoder
        self.shuffle_buffer = shuffle_buffer
        self.process_index = process_index
        self.num_processes = num_processes
        self.start: dict[str, ReaderState] = {}  # reader -> where it resumes (from a checkpoint)

    def describe(self) -> str:
        return describe_stream(self.shuffle_buffer)

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        reader = f"{self.process_index}/{worker.id if worker is not None else 0}"
        state = self.start.get(reader, ReaderState()).snapshot()
        stream = self.rows.stream
        if self.num_processes > 1:
            stream = split_dataset_by_node(stream, rank=self.process_index, world_size=self.num_processes)
        if self.shuffle_buffer:
            stream = stream.shuffle(seed=self.rows.seed, buffer_size=self.shuffle_buffer)
        while True:
            from_start, kept_before = state.position == 0, state.kept
            stream.set_epoch(state.epoch)
            for position, raw in enumerate(stream):  # in a dataloader worker, datasets reads the worker's shards
                if position < state.position:  # read before the checkpoint this run resumed from
                    continue
                state.position, state.read = position + 1, state.read + 1
                if not self.rows.selected(raw, held_out=False):
                    continue
                outcome = self.rows.check.outcome(raw, position, self.rows.has_idx)
                if outcome.reason is not None:
                    state.skipped[outcome.reason] = state.skipped.get(outcome.reason, 0) + 1
                    log.warning("skipped streamed row %d of pass %d, reader %s (idx %s): %s", position, state.epoch,
                                reader, outcome.idx, BadRow(outcome.reason, outcome.detail))
                    continue
                state.kept, state.truncated = state.kept + 1, state.truncated + outcome.truncated
                try:
                    pair = self.encoder.encode(self.rows.canonical(raw, position))
                except (BadRow, StopIteration) as exc:  # as PairDataset: never end the stream silently
                    raise RuntimeError(f"streamed row {position} passed validation but failed to encode: {exc!r}") from exc
                pair.stream_state = (reader, state.snapshot())
                yield pair
            if from_start and state.kept == kept_before:  # a whole pass gave nothing: this reader has no rows
                log.warning("reader %s found no usable training row in a whole pass of the stream", reader)
                return
            state.epoch, state.position = state.epoch + 1, 0


class StreamProgress:
    """The trainer's record of the last pair trained from each reader of this process: saved in checkpoints."""

    def __init__(self, layout: dict[str, int]):
        self.layout = layout  # processes and dataloader workers: a stream position means nothing under others
        self.readers: dict[str, ReaderState] = {}

    def record(self, stream_states: list[tuple[str, ReaderState]]) -> None:
        for reader, state in stream_states:  # a reader's pairs come in order: the last one is the furthest
            self.readers[reader] = state

    def save(self, folder: Path, process_index: int) -> None:
        payload = {"layout": self.layout, "readers": {r: dataclasses.asdict(s) for r, s in self.readers.items()}}
        Path(folder).mkdir(parents=True, exist_ok=True)  # a process may get here before the one that saves the model
        (Path(folder) / STATE_FILE.format(rank=process_index)).write_text(json.dumps(payload, indent=1))

    def load(self, checkpoint: Path, process_index: int) -> dict[str, ReaderState]:
        path = Path(checkpoint) / STATE_FILE.format(rank=process_index)
        if not path.is_file():
            raise ConfigError(f"--resume with data.streaming: {checkpoint.name} has no {path.name} (it was not "
                              "written by a streamed run of this many processes)")
        payload = json.loads(path.read_text())
        if payload["layout"] != self.layout:
            raise ConfigError(f"--resume with data.streaming: {checkpoint.name} was streamed by {payload['layout']}, "
                              f"this run has {self.layout}; positions in a stream hold only for the same processes "
                              "and dataloader workers")
        self.readers = {r: ReaderState(**s) for r, s in payload["readers"].items()}
        return {r: s.snapshot() for r, s in self.readers.items()}

    def totals(self) -> dict[str, Any]:
        skipped = Counter()
        for state in self.readers.values():
            skipped.update(state.skipped)
        return {"read": sum(s.read for s in self.readers.values()), "kept": sum(s.kept for s in self.readers.values()),
                "truncated": sum(s.truncated for s in self.readers.values()),
                "passes": max((s.epoch + 1 for s in self.readers.values()), default=0), "skipped": dict(skipped)}


def check_streaming(cfg, args) -> None:
    """What a stream rules out, as one-line errors before anything loads."""
    if not cfg.data.streaming:
        return
    if args.max_steps <= 0:
        raise ConfigError("data.streaming: a stream has no length, so epochs cannot end a run: set training.max_steps")
    if cfg.loss.precompute_reference:
        raise ConfigError("data.streaming: loss.precompute_reference needs every training pair up front; stream with "
                          "the live reference (precompute_reference: false)")


def add_to_report(report: SkipReport, split: str, totals: list[dict[str, Any]]) -> None:
    """The training stream's counts (of every process) into the run's skip report, at the end of training."""
    for part in totals:
        report.kept[split] += part["kept"]
        report.truncated[split] += part["truncated"]
        report.reasons.update(part["skipped"])
        report.streamed[split] += part["read"]


def streamed_pairs(data_cfg, encoder: PairEncoder, *, train: bool, limit: int | None, process_index: int,
                   num_processes: int):
    """`load_pairs` for `data.streaming`: (StreamedPairs | None, validation PairDataset | None, SkipReport)."""
    report = SkipReport()
    validation = None
    held_out = data_cfg.validation_fraction if data_cfg.validation_split is None else 0.0
    if data_cfg.validation_split is not None:  # every row of a validation split is held out
        rows = open_rows(data_cfg, data_cfg.validation_split, 1.0, encoder)
        validation = held_out_pairs(rows, data_cfg.validation_split, limit, report)
    elif held_out > 0:
        validation = held_out_pairs(open_rows(data_cfg, data_cfg.train_split, held_out, encoder), "validation", limit,
                                    report)
    pairs = None
    if train:
        rows = open_rows(data_cfg, data_cfg.train_split, held_out, encoder)
        pairs = StreamedPairs(rows, encoder, data_cfg.shuffle_buffer, process_index, num_processes)
    return pairs, PairDataset(validation, encoder) if validation is not None else None, report
