"""`data.streaming`: a stream keeps and skips the rows the non-streamed path does, splits by a row's own hash,
gives each process and dataloader worker its own part, never ends, and resumes at the next row to the pair."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch

from conftest import QUICKSTART
from test_cli import assert_one_line_error, main_in_process
from test_sources import png
from test_train_e2e import adapter, cli, kill_when_written, largest_difference, records

from vlm_orpo.config import DataConfig
from vlm_orpo.data.packing import PairEncoder, load_pairs
from vlm_orpo.data.streaming import ReaderState, StreamedPairs

GOOD_ROWS = 60
# bad rows as the non-streamed validation sees them (test_sources has one of each reason)
BAD = [
    {"image": {"bytes": b"not a png at all", "path": None}},
    {"chosen": "   "},
    {"question": None},
    {"image": None},
    {"rejected": "__chosen__"},
]


@pytest.fixture(autouse=True)
def no_shutdown_sleep(monkeypatch):
    """datasets 5.2 sleeps 5 s whenever a parquet stream's reader threads shut down (at the end of a pass, or when
    a test stops reading), a guard against an Arrow crash at interpreter exit; these tests stop streams often."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


@pytest.fixture(scope="module")
def stream_folder(asset_cache, tmp_path_factory) -> str:
    """Two parquet shards: 60 good rows of the bundled train split with five bad ones among them."""
    source = datasets.load_dataset("parquet", data_files=asset_cache["train"])["train"].select(range(GOOD_ROWS))
    source = source.cast_column("image", datasets.Image(decode=False))
    rows = [dict(r) for r in source]
    for n, bad in enumerate(BAD):
        row = {**rows[n], "idx": 1000 + n, **bad}
        if row["rejected"] == "__chosen__":
            row["rejected"] = row["chosen"]
        rows.insert(7 * n + 3, row)
    folder = tmp_path_factory.mktemp("stream") / "data"
    folder.mkdir()
    half = len(rows) // 2
    for part, chunk in enumerate((rows[:half], rows[half:])):
        ds = datasets.Dataset.from_list(chunk, features=source.features).cast_column("image", datasets.Image())
        ds.to_parquet(str(folder / f"part-{part}.parquet"))
    return str(folder)


@pytest.fixture(scope="module")
def encoder(tiny_processor):
    return PairEncoder(tiny_processor, max_answer_tokens=32)


def stream(folder, encoder, **data) -> StreamedPairs:
    train, _, _ = load_pairs(DataConfig(source=folder, streaming=True, **data), encoder)
    return train


def first_pass(pairs) -> list:
    """The pairs up to the end of the first pass over the data (the stream itself never ends)."""
    return list(itertools.takewhile(lambda p: p.stream_state[1].epoch == 0, iter(pairs)))


def test_one_pass_keeps_and_counts_exactly_what_the_non_streamed_path_does(stream_folder, encoder, caplog):
    train, _, report = load_pairs(DataConfig(source=stream_folder), encoder)
    expected = sorted(train[i].idx for i in range(len(train)))
    assert len(expected) == GOOD_ROWS and report.total_skipped == len(BAD)
    for buffer in (0, 16):
        caplog.clear()
        pairs = first_pass(stream(stream_folder, encoder, shuffle_buffer=buffer))
        assert sorted(p.idx for p in pairs) == expected  # each good row once, none of the bad ones
        last = pairs[-1].stream_state[1]
        assert Counter(last.skipped) == report.reasons and last.kept == GOOD_ROWS
        assert last.read <= GOOD_ROWS + len(BAD)  # the bad rows after the last good one are counted next pass
        logged = [m for m in caplog.messages if m.startswith("skipped streamed row")]
        assert len(logged) == sum(last.skipped.values())
    shuffled = [p.idx for p in first_pass(stream(stream_folder, encoder, shuffle_buffer=16))]
    assert shuffled != sorted(shuffled) and shuffled == [p.idx for p in first_pass(
        stream(stream_folder, encoder, shuffle_buffer=16))]  # shuffled, and the same way each time (seeded)


def test_the_stream_goes_round_again_reshuffled(stream_folder, encoder):
    pairs = list(itertools.islice(iter(stream(stream_folder, encoder, shuffle_buffer=16)), 2 * GOOD_ROWS + 5))
    passes = [[p.idx for p in pairs if p.stream_state[1].epoch == e] for e in (0, 1)]
    assert sorted(passes[0]) == sorted(passes[1]) and passes[0] != passes[1]
    assert pairs[-1].stream_state[1].epoch == 2 and pairs[-1].stream_state[1].kept == 2 * GOOD_ROWS + 5


def test_a_resumed_reader_goes_on_with_the_next_pair_and_its_counts(stream_folder, encoder):
    straight = list(itertools.islice(iter(stream(stream_folder, encoder, shuffle_buffer=16)), 2 * GOOD_ROWS))
    for k in (7, GOOD_ROWS, GOOD_ROWS + 3):  # mid-pass, at the end of a pass, into the second pass
        resumed = stream(stream_folder, encoder, shuffle_buffer=16)
        reader, state = straight[k - 1].stream_state
        resumed.start = {reader: state}
        again = list(itertools.islice(iter(resumed), 20))
        assert [(p.idx, p.prompt_ids, p.chosen_ids) for p in again] == [
            (p.idx, p.prompt_ids, p.chosen_ids) for p in straight[k : k + 20]]
        assert again[-1].stream_state == straight[k + 19].stream_state  # counts carry on, none twice


def test_processes_read_disjoint_parts_that_cover_the_data(stream_folder, encoder):
    train, _, _ = load_pairs(DataConfig(source=stream_folder), encoder)
    parts = []
    for rank in (0, 1):
        pairs, _, _ = load_pairs(DataConfig(source=stream_folder, streaming=True), encoder, process_index=rank,
                                 num_processes=2)
        parts.append({p.idx for p in first_pass(pairs)})
        assert {p.stream_state[0] for p in first_pass(pairs)} == {f"{rank}/0"}
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    assert parts[0] | parts[1] == {train[i].idx for i in range(len(train))}


def loader(pairs: StreamedPairs) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(pairs, batch_size=4, num_workers=2, collate_fn=list)


def test_dataloader_workers_read_their_own_shards_and_resume_each(stream_folder, encoder):
    straight = list(itertools.islice(loader(stream(stream_folder, encoder, shuffle_buffer=8)), 12))
    readers = [{p.stream_state[0] for p in batch} for batch in straight]
    assert readers[:4] == [{"0/0"}, {"0/1"}, {"0/0"}, {"0/1"}]  # the DataLoader takes a batch from each in turn
    seen = [p.idx for batch in straight for p in batch if p.stream_state[1].epoch == 0]
    assert len(seen) == len(set(seen))
    resumed = stream(stream_folder, encoder, shuffle_buffer=8)
    resumed.start = {p.stream_state[0]: p.stream_state[1] for batch in straight[:4] for p in batch}
    again = list(itertools.islice(loader(resumed), 8))
    assert [[p.idx for p in b] for b in again] == [[p.idx for p in b] for b in straight[4:]]


def test_held_out_rows_follow_their_hash_not_their_place(stream_folder, encoder):
    cfg = dict(source=stream_folder, streaming=True, validation_fraction=0.25, eval_limit=100, subset_fraction=0.8)
    train, validation, report = load_pairs(DataConfig(**cfg), encoder, limit=100)
    held = {validation[i].idx for i in range(len(validation))}
    trained = {p.idx for p in first_pass(train)}
    assert held and trained and not held & trained
    assert 0.6 * GOOD_ROWS <= len(held | trained) < GOOD_ROWS  # the subset leaves about a fifth out
    assert report.kept["validation"] == len(held)
    reordered = stream(stream_folder, encoder, shuffle_buffer=32, validation_fraction=0.25, eval_limit=100,
                       subset_fraction=0.8)
    assert {p.idx for p in first_pass(reordered)} == trained  # another order, the same rows
    _, limited, _ = load_pairs(DataConfig(**cfg), encoder, limit=3)
    assert len(limited) == 3


def test_a_named_validation_split_is_read_whole_up_to_the_limit(asset_cache, encoder):
    _, validation, report = load_pairs(DataConfig(streaming=True, validation_split="validation", eval_limit=5,
                                                  where={"task": "colour"}), encoder, train=False, limit=5)
    assert len(validation) == 5 and report.kept["validation"] == 5
    assert all(validation.rows.raw(i)["task"] == "colour" for i in range(5))


def test_a_jsonl_stream_with_relative_image_paths_and_no_idx(tmp_path, encoder):
    """JSON streams declare no columns (the first row names them) and their parquet-only read size is left out."""
    import json

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png())
    lines = [{"images": ["images/a.png"], "prompt": f"Describe it ({i}).", "chosen": "A red square.",
              "rejected": "A blue circle."} for i in range(3)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    pairs = first_pass(stream(str(tmp_path / "d.jsonl"), encoder, shuffle_buffer=0))
    assert [p.idx for p in pairs] == [0, 1, 2]  # no idx column: the row's place in the stream
    assert pairs[0].image_inputs["pixel_values"].shape[0] == 1


def test_streaming_mistakes_are_one_line(asset_cache, tmp_path, capsys):
    run = ["train", "--config", QUICKSTART, f"training.output_dir={tmp_path / 'run'}", "data.streaming=true"]
    assert_one_line_error(main_in_process(capsys, *run), "data.eval_limit")
    assert_one_line_error(main_in_process(capsys, *run, "data.eval_limit=8"), "training.max_steps")
    result = main_in_process(capsys, *run, "data.eval_limit=8", "training.max_steps=2", "loss.type=dpo",
                             "loss.precompute_reference=true")
    assert_one_line_error(result, "precompute_reference")
    result = main_in_process(capsys, *run, "data.eval_limit=8", "training.max_steps=2", "--dry-run")
    assert result.returncode == 0 and "streamed" in result.stdout


def test_a_resume_under_another_layout_is_one_line(tmp_path):
    from vlm_orpo.data.streaming import StreamProgress
    from vlm_orpo.errors import ConfigError

    progress = StreamProgress({"processes": 1, "workers": 0})
    progress.record([("0/0", ReaderState(position=5, read=5, kept=4))])
    progress.save(tmp_path / "checkpoint-4", 0)
    assert StreamProgress({"processes": 1, "workers": 0}).load(tmp_path / "checkpoint-4", 0) == {
        "0/0": ReaderState(position=5, read=5, kept=4)}
    with pytest.raises(ConfigError, match="same processes and dataloader workers"):
        StreamProgress({"processes": 1, "workers": 2}).load(tmp_path / "checkpoint-4", 0)
    with pytest.raises(ConfigError, match="no stream_state-rank1.json"):
        StreamProgress({"processes": 2, "workers": 0}).load(tmp_path / "checkpoint-4", 1)


def streamed_run_args(run: Path) -> list[str]:
    return ["train", "--config", QUICKSTART, f"training.output_dir={run}", "data.streaming=true",
            "data.shuffle_buffer=64", "data.eval_limit=16", "training.max_steps=12", "training.save_steps=4",
            "training.eval_steps=12", "training.logging_steps=1", "training.per_device_train_batch_size=4",
            "training.save_total_limit=null"]


@pytest.mark.slow
def test_a_streamed_run_resumes_after_sigkill_like_the_uninterrupted_run(asset_cache, tmp_path):
    straight = tmp_path / "straight"
    result = cli(*streamed_run_args(straight), env=dict(os.environ))
    assert "train pairs: streamed" in result.stdout and "train 48 (streamed:" in result.stdout
    assert (straight / "checkpoint-8" / "stream_state-rank0.json").is_file()

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "vlm_orpo.cli", *streamed_run_args(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    kill_when_written(proc, killed / "checkpoint-8")
    assert not (killed / "final").exists(), "the kill must land mid-training"
    resumed = cli(*streamed_run_args(killed), "--resume", env=dict(os.environ))
    assert "train 48 (streamed:" in resumed.stdout  # the counts go on from the checkpoint's
    one_step = largest_difference(adapter(straight, "checkpoint-12"), adapter(straight, "checkpoint-8")) / 4
    assert one_step > 1e-4, "the run must train, or the comparison proves nothing"
    # the same pairs in the same order after the resume (see test_train_e2e for the tolerance)
    assert largest_difference(adapter(straight), adapter(killed)) < 0.05 * one_step
    losses = lambda run: {r["step"]: r["loss"] for r in records(run) if "loss" in r and "train_runtime" not in r}  # noqa: E731
    assert losses(killed).keys() == set(range(1, 13))
    for step in range(9, 13):
        assert abs(losses(killed)[step] - losses(straight)[step]) <= 1e-4 * abs(losses(straight)[step])
