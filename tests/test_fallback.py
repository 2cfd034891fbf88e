"""The plain two-sequence fallback: any image-text-to-text model without a family entry, or with recurrent
layers, trains on it with the same losses, metrics and checkpoints; `model.forward_mode` chooses."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from test_train_e2e import records, train_in_process
from vlm_orpo.errors import ConfigError
from vlm_orpo.modeling import families
from vlm_orpo.modeling.forward import resolve_forward_mode

SHORT = ("training.max_steps=4", "training.logging_steps=1", "training.eval_steps=4", "training.save_steps=4",
         "data.eval_limit=16")
FALLBACK_NOTE = "family llava_next has no shared-prefix support yet: plain two-sequence forward"


def test_forward_mode_resolution():
    llava = AutoConfig.for_model("llava_next")
    hybrid = AutoConfig.for_model("qwen3_5")  # Gated DeltaNet (linear attention) layers between attention layers
    assert resolve_forward_mode("auto", llava) == "packed"
    assert resolve_forward_mode("plain", llava) == "plain"
    assert families.recurrent_layers(hybrid) == ["linear_attention"]
    assert resolve_forward_mode("auto", hybrid) == "plain"
    with pytest.raises(ConfigError, match="qwen3_5 has linear_attention layers, whose recurrent state would carry"):
        resolve_forward_mode("packed", hybrid)
    generic = families.family_for(hybrid)  # no entry: its modules are found on a meta-device copy
    assert (generic.packed, generic.language_model, generic.vision_tower) == (False, "model.language_model",
                                                                             "model.visual")
    glm4v = AutoConfig.for_model("glm4v")  # a family transformers has and we have not packed: the plain forward
    assert families.recurrent_layers(glm4v) == [] and resolve_forward_mode("auto", glm4v) == "plain"
    with pytest.raises(ConfigError, match="family glm4v has no shared-prefix support yet"):
        resolve_forward_mode("packed", glm4v)


def test_a_model_with_no_family_trains_on_the_plain_forward_to_the_same_numbers(asset_cache, tmp_path, capsys,
                                                                                caplog, monkeypatch):
    packed = train_in_process(capsys, *SHORT, f"training.output_dir={tmp_path / 'packed'}")
    assert packed.returncode == 0, packed.stderr[-3000:]
    assert "forward: packed shared prefix" in packed.stdout

    monkeypatch.delitem(families._ENTRIES, "llava_next")  # as if LLaVA-NeXT had no family entry
    plain = train_in_process(capsys, *SHORT, f"training.output_dir={tmp_path / 'plain'}")
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "forward: plain, two sequences per pair" in plain.stdout
    assert caplog.messages.count(FALLBACK_NOTE) == 1, "said once per run"

    curves = [[r for r in records(tmp_path / name) if "loss" in r or "eval_loss" in r] for name in ("packed", "plain")]
    assert [r["step"] for r in curves[0]] == [r["step"] for r in curves[1]] and len(curves[0]) >= 5
    for a, b in zip(*curves):
        for key in ("loss", "eval_loss", "rewards/accuracies", "eval_rewards/margins", "logps/chosen"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), (a["step"], key)
    for name in ("packed", "plain"):
        assert json.loads((tmp_path / name / "final" / "run.json").read_text())["step"] == 4
        assert (tmp_path / name / "final" / "adapter_model.safetensors").is_file()
