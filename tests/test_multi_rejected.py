"""Several rejected answers per prompt (issue 13, section 3): a prompt with k rejected answers is packed once as
`[P, C, R1..Rk]` (each answer restarting at P, seeing only P and itself) and equals the plain forward of k + 1
sequences; its loss is the mean over the k (chosen, rejected i) pairs; the data accepts list-valued `rejected`
and `rejected_1..k` columns, counting bad entries; a CLI run on such data trains."""

from __future__ import annotations

import dataclasses
import json

import datasets
import pytest
import torch

from conftest import ROOT
from equivalence import assert_equivalent, lora_model, rel_err, with_rejected
from test_attention import allowed_by_layout
from test_shared_prefix import llava15, llava15_pairs, llava_next
from test_sources import GOOD, canonical, png, write_parquet
from vlm_orpo.config import LossConfig
from vlm_orpo.data.packing import PackedCollator, PairEncoder, Part
from vlm_orpo.data.sources import prepare_data
from vlm_orpo.errors import DataError
from vlm_orpo.losses import pair_losses
from vlm_orpo.modeling import attention
from vlm_orpo.modeling.shared_prefix import dense_mask, packed_logps, set_attention_backend
from vlm_orpo.reference import AdapterDisabled


@pytest.mark.parametrize("backend", ["sdpa", "pairs"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("rows", ["group-per-row", "padded-rows"])
def test_llava_next_groups_equal_the_plain_forward_of_k_plus_1_sequences(asset_cache, tiny_pairs, backend, k, rows):
    encoder, pairs = tiny_pairs
    groups = with_rejected(pairs[:3], k)
    assert [g.rejected_count for g in groups] == [k] * 3
    cap = None if rows == "group-per-row" else len(groups[0]) + len(groups[1])  # [g0, g1] and [g2] + padding
    batch = assert_equivalent(llava_next(asset_cache, backend), groups, encoder.tokenizer.pad_token_id,
                              encoder.image_token_id, cap)
    assert batch["segment_tokens"].shape[0] == 3 * k and len(batch["meta"]) == 3 * k
    assert batch["images"]["pixel_values"].shape[0] == 3, "one image per prompt, whatever k"
    if cap is not None:
        assert batch["input_ids"].shape[0] == 2 and (batch["span"] == -1).any()


@pytest.mark.parametrize("backend", ["sdpa", "pairs"])
def test_llava15_mixed_k_several_groups_a_row_with_gradient_checkpointing(backend):
    groups = [dataclasses.replace(g, more_rejected_ids=g.more_rejected_ids[: i % 3])
              for i, g in enumerate(with_rejected(llava15_pairs(), 3))]
    assert [g.rejected_count for g in groups] == [1, 2, 3, 1, 2]
    batch = assert_equivalent(llava15(backend), groups, 0, 127, 120, gradient_checkpointing=True)
    assert any(len(set(row.tolist()) - {-1}) > 1 for row in batch["pair_index"]), "groups must share a row"


def test_each_answer_sees_only_the_prompt_and_itself_and_restarts_at_the_prompts_end():
    [group] = with_rejected(llava15_pairs(1), 3)
    batch = PackedCollator(0, 127)([group])
    mask = dense_mask(batch["pair_index"], batch["span"])[0, 0]
    span, positions = batch["span"][0], batch["position_ids"][0]
    P = len(group.prompt_ids)
    assert span.tolist() == [Part.PROMPT] * P + [Part.CHOSEN] * len(group.chosen_ids) + [
        Part.REJECTED + i for i, ids in enumerate(group.all_rejected_ids) for _ in ids]
    for answer in range(Part.CHOSEN, Part.REJECTED + 3):
        mine = span == answer
        assert positions[mine].tolist() == list(range(P, P + int(mine.sum())))
        assert mask[mine][:, span == Part.PROMPT].all()
        assert not mask[mine][:, (span != Part.PROMPT) & ~mine].any()
        assert torch.equal(mask[mine][:, mine], torch.ones(int(mine.sum()), int(mine.sum())).tril().bool())


def test_pairs_layout_allows_exactly_the_dense_mask_with_mixed_k():
    groups = [dataclasses.replace(g, more_rejected_ids=g.more_rejected_ids[: i % 3])
              for i, g in enumerate(with_rejected(llava15_pairs(), 3))]
    batch = PackedCollator(0, 127, max_tokens_per_row=120)(groups)
    pair_index, span = batch["pair_index"], batch["span"]
    rows, T = pair_index.shape
    allowed = allowed_by_layout(attention.pair_layout(pair_index, span), rows * T)
    expected = torch.block_diag(*dense_mask(pair_index, span)[:, 0])
    real = (pair_index >= 0).flatten()
    assert torch.equal(allowed[real][:, real], expected[real][:, real])


def test_flex_forward_equals_sdpa_with_three_rejected(asset_cache, tiny_pairs):
    """FlexAttention has no CPU backward in torch 2.13; its forward must agree with SDPA (as in test_shared_prefix)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    encoder, pairs = tiny_pairs
    model = llava_next(asset_cache)
    batch = PackedCollator(encoder.tokenizer.pad_token_id, encoder.image_token_id, 4000)(with_rejected(pairs[:2], 3))
    with torch.no_grad():
        dense = packed_logps(model, batch)
        set_attention_backend(model, "flex")
        try:
            flex = packed_logps(model, batch)
        except Exception as exc:  # pragma: no cover - depends on the CPU inductor toolchain
            pytest.skip(f"flex attention forward unavailable on this CPU: {type(exc).__name__}")
    assert rel_err(flex.chosen, dense.chosen) <= 1e-5
    assert rel_err(flex.rejected, dense.rejected) <= 1e-5


def test_one_rejected_in_a_list_is_exactly_todays_pair(tiny_processor):
    encoder = PairEncoder(tiny_processor)
    row = {"idx": 0, "image": png(), **GOOD}
    pair, listed = encoder.encode(row), encoder.encode({**row, "rejected": [GOOD["rejected"]]})
    assert listed.rejected_count == 1 and listed.all_rejected_ids == [pair.rejected_ids]
    collator = PackedCollator(tiny_processor.tokenizer.pad_token_id, encoder.image_token_id)
    a, b = collator([pair]), collator([listed])
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
    assert a["meta"] == b["meta"]


@pytest.mark.parametrize("loss", [LossConfig(type="orpo", orpo_lambda=0.5), LossConfig(type="dpo", beta=0.1),
                                  LossConfig(type="simpo", beta=2.0)], ids=lambda c: c.type)
def test_the_loss_is_the_mean_over_the_k_pairs(asset_cache, tiny_pairs, loss):
    encoder, pairs = tiny_pairs
    model = lora_model(llava_next(asset_cache))  # random LoRA B: the policy differs from its reference
    reference = AdapterDisabled(model) if loss.needs_reference else None
    collator = PackedCollator(encoder.tokenizer.pad_token_id, encoder.image_token_id)
    [group] = with_rejected(pairs[:1], 3)
    singles = [dataclasses.replace(group, rejected_ids=ids, more_rejected_ids=[]) for ids in group.all_rejected_ids]

    def losses(batch):
        ref = reference.logps(model, batch) if reference is not None else None
        logps = packed_logps(model, batch)
        return logps, pair_losses(logps, loss, ref)["loss"]

    with torch.no_grad():
        logps, together = losses(collator([group]))
        apart = torch.cat([losses(collator([single]))[1] for single in singles])
    assert together.shape == (3,) and torch.allclose(logps.chosen, logps.chosen[:1].expand(3))
    assert together.mean().item() == pytest.approx(apart.mean().item(), rel=1e-5)
    assert torch.allclose(together, apart, rtol=1e-5, atol=1e-6)


def test_list_valued_rejected_loads_and_bad_entries_are_skipped_and_counted(tmp_path, tiny_processor, caplog):
    img = {"bytes": png(), "path": None}
    lists = [
        ["The shape is blue."],
        ["The shape is blue.", "The shape is green."],
        ["The shape is blue.", "The shape is green.", "The shape is black."],
        [],  # no rejected answer
        ["The shape is blue.", 5],  # not text
        ["The shape is blue.", "  "],  # empty answer
        ["The shape is blue.", GOOD["chosen"]],  # the chosen answer again
    ]
    rows = [{"image": img, "idx": i, "question": GOOD["question"], "chosen": GOOD["chosen"], "rejected": r}
            for i, r in enumerate(lists)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({**r, "image": "img.png"}) + "\n" for r in rows))
    (tmp_path / "img.png").write_bytes(png())
    encoder = PairEncoder(tiny_processor)
    data = prepare_data(str(tmp_path / "d.jsonl"), check_tokens=encoder.check)
    kept = canonical(data.train)
    assert [r["idx"] for r in kept] == [0, 1, 2]
    assert [r["rejected"] for r in kept] == lists[:3]
    assert [encoder.encode(r).rejected_count for r in kept] == [1, 2, 3]
    assert dict(data.report.reasons) == {"empty rejected": 2, "bad rejected": 1, "chosen identical to rejected": 1}
    assert sum(m.startswith("skipped train row") for m in caplog.messages) == 4


def test_rejected_columns_numbered_or_mapped(tmp_path):
    img = {"bytes": png(), "path": None}
    rows = [{"image": img, "question": "q", "chosen": "yes", "rejected_2": "no", "rejected_1": "nope", "bad": "nah"},
            {"image": img, "question": "q", "chosen": "yes", "rejected_2": None, "rejected_1": "nope", "bad": "nah"},
            {"image": img, "question": "q", "chosen": "yes", "rejected_2": None, "rejected_1": None, "bad": "nah"}]
    path = write_parquet(tmp_path / "d.parquet", rows)
    data = prepare_data(path)  # rejected_1..k found without a mapping, in number order; a null is no answer
    assert [r["rejected"] for r in canonical(data.train)] == [["nope", "no"], ["nope"]]
    assert dict(data.report.reasons) == {"missing rejected": 1}
    mapped = prepare_data(path, columns={"rejected": ["bad", "rejected_1"]})
    assert [r["rejected"] for r in canonical(mapped.train)] == [["nah", "nope"], ["nah", "nope"], ["nah"]]
    with pytest.raises(DataError, match=r"data.columns.rejected names columns \['worse'\]"):
        prepare_data(path, columns={"rejected": ["bad", "worse"]})


def test_evaluation_gathers_every_pair_of_a_row_once():
    """accelerate cuts the last gathered batch to the rows left (dropping rows repeated to even out processes):
    the cut must fall between rows, never between the pairs of one row."""
    from types import SimpleNamespace

    from vlm_orpo.scoring import gathered_pairs

    rows_left = 2  # the last batch holds rows 0 and 1 for real, row 2 is a repeat
    accelerator = SimpleNamespace(gather_for_metrics=lambda t: t[:rows_left], pad_across_processes=lambda t, dim: t)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # pairs of rows with 3, 1 and 2 rejected answers
    assert gathered_pairs(accelerator, values, torch.tensor([3, 1, 2])).tolist() == [1.0, 2.0, 3.0, 4.0]


def multi_rejected_data(asset_cache, folder, k: int) -> str:
    """The bundled colour rows as JSONL with k rejected answers each: the row's own wrong colour, then others."""
    from vlm_orpo.assets.synthetic import COLOURS

    data = datasets.load_dataset("parquet", data_files=asset_cache["train"], split="train")
    data = data.filter(lambda task: task == "colour", input_columns="task")
    lines = []
    for i, row in enumerate(data.select(range(48))):
        row["image"].save(folder / f"{i}.png")
        wrong = [c for c in COLOURS if c != row["target"] and c not in row["rejected"]]
        more = [row["rejected"].replace(next(c for c in COLOURS if c in row["rejected"]), c) for c in wrong[: k - 1]]
        lines.append(json.dumps({"image": f"{i}.png", "question": row["question"], "chosen": row["chosen"],
                                 "rejected": [row["rejected"], *more], "idx": row["idx"], "task": "colour",
                                 "target": row["target"]}))
    (folder / "multi.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "multi.jsonl")


def test_cli_trains_on_three_rejected_per_prompt_with_a_precomputed_reference(asset_cache, tmp_path, capsys):
    """Train with a live and with a precomputed reference (the same first steps), then evaluate: one per-pair
    line per (chosen, rejected i) pair and model, and the generations page lists every rejected answer."""
    from test_cli import main_in_process

    source = multi_rejected_data(asset_cache, tmp_path, 3)
    config = ["--config", str(ROOT / "configs" / "quickstart_dpo.yaml"), f"data.source={source}",
              "data.validation_split=null", "data.validation_fraction=0.25"]

    def run(out, *overrides):
        result = main_in_process(
            capsys, "train", *config, "training.max_steps=2", "training.logging_steps=1", "training.eval_steps=2",
            "training.save_steps=2", f"training.output_dir={out}", *overrides)
        assert result.returncode == 0, result.stderr[-3000:]
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], result.stdout

    live, _ = run(tmp_path / "live")
    pre, stdout = run(tmp_path / "pre", "loss.precompute_reference=true")
    assert "data: kept validation 12, train 36; no rows skipped" in stdout
    assert [r["step"] for r in live] == [r["step"] for r in pre]
    assert {r["eval_pairs"] for r in pre if "eval_pairs" in r} == {12 * 3}, "each held-out prompt scores 3 pairs"
    for a, b in zip(live, pre):
        for key in ("loss", "rewards/margins", "logps/ref_rejected", "eval_loss", "eval_rewards/margins"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    result = main_in_process(capsys, "evaluate", *config, "--adapters", str(tmp_path / "pre" / "final"),
                             "--out", str(tmp_path / "eval"), "--per-pair", str(tmp_path / "pairs.jsonl"),
                             "--generate", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 12 * 3  # base and adapter, 12 held-out prompts, 3 pairs each
    for model in ("base", str(tmp_path / "pre" / "final")):
        rows = [line for line in lines if line["model"] == model]
        for first in range(0, len(rows), 3):
            triple = rows[first : first + 3]
            assert len({line["idx"] for line in triple}) == 1
            assert len({str(line["rejected_ids"]) for line in triple}) == 3
            assert len({line["chosen_logp"] for line in triple}) == 1  # one chosen, scored once, shared
    assert "rejected: The shape is" in (tmp_path / "eval" / "generations.html").read_text().replace(" | ", "")
