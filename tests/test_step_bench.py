"""benchmarks/step_bench.py: the CPU smoke run and its JSON contract, the 7b geometries (LLaVA-NeXT, Qwen2.5-VL)
and FLOP formula, other families end to end, and `modeling.compile.compile_decoder_layers`. No timing is
asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "step_bench.py"
CONTRACT_KEYS = {"median_s", "pairs_per_s", "tokens_per_s", "mfu", "peak_gib", "loss"}
sys.path.insert(0, str(BENCH.parent))  # the harness package `bench`, as step_bench.py imports it

from bench.families import SIZES  # noqa: E402
from bench.flops import step_flops, text_linears  # noqa: E402
from bench.geometry import build_config, build_image_processor, build_model, make_pairs  # noqa: E402
from bench.profiling import aggregate_profile  # noqa: E402
from bench.report import summarize  # noqa: E402


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    paths = [str(REPO / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    cmd = [
        sys.executable, str(BENCH), "--size", "small", "--device", "cpu", "--pairs-per-step", "1", "4",
        "--steps", "3", "--warmup", "1", "--json", str(out / "r.json"), "--profile", str(out / "profile.txt"),
        "--profile-steps", "1",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return proc, out


@pytest.mark.slow
def test_cpu_smoke_json_contract(smoke_run):
    proc, out = smoke_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "r.json").read_text())
    assert {"device", "versions", "variants", "config", "loss_check", "date"} <= report.keys()
    assert report["complete"] is True
    assert report["device"]["type"] == "cpu"
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["transformers"]
    variants = report["variants"]
    assert {"plain", "packed_sdpa", "packed_flex", "plain_x4", "packed_sdpa_x4", "packed_flex_x4"} <= variants.keys()
    for name, v in variants.items():
        assert CONTRACT_KEYS <= v.keys(), name
    for name in ("plain", "packed_sdpa", "plain_x4", "packed_sdpa_x4"):
        v = variants[name]
        assert v["skipped"] is None and v["median_s"] > 0 and v["pairs_per_s"] > 0 and v["tokens_per_s"] > 0
        assert v["mfu"] is None and v["peak_gib"] is None  # CPU: no peak FLOP/s table, no allocator peak
        assert len(v["times_s"]) == 3
    # FlexAttention has no CPU backward: recorded as skipped with a reason, not a crash
    assert variants["packed_flex"]["skipped"] and variants["packed_flex"]["median_s"] is None
    # losses agree, and the packed row is shorter than the two plain sequences
    assert report["loss_check"]["ok"] is True
    for n in ("", "_x4"):
        plain, packed = variants[f"plain{n}"], variants[f"packed_sdpa{n}"]
        assert packed["loss"] == pytest.approx(plain["loss"], rel=1e-4)
        assert packed["tokens_per_step"] < plain["tokens_per_step"]
        assert packed["flops_per_step"]["total"] < plain["flops_per_step"]["total"]
    assert "loss check" in proc.stdout and "| variant |" in proc.stdout


@pytest.mark.slow
def test_cpu_smoke_profile_and_summary(smoke_run):
    proc, out = smoke_run
    assert proc.returncode == 0
    text = (out / "profile.txt").read_text()
    assert "by model part" in text and "by op kind" in text
    report = json.loads((out / "r.json").read_text())
    parts = report["profile"]["packed_sdpa"]["by_part"]
    for part in ("LM head", "LoRA A/B + scale/add", "vision tower", "attention core + rope + reshapes"):
        assert part in parts, sorted(parts)
    assert sum(p["share"] for p in parts.values()) == pytest.approx(1.0, abs=1e-6)
    table = summarize([str(out / "r.json")])
    assert "packed_sdpa_x4" in table and "vs eager plain" in table


def test_7b_geometry_gives_2340_image_tokens(tiny_processor):
    """The bench's pixel pipeline and the model's feature count agree with the processor's own token rule."""
    from transformers import LlavaNextProcessor

    geometry = SIZES["llava_next"]["7b-tiny"]  # the 7b image geometry and answer lengths, tiny widths
    model = build_model(geometry, torch.device("cpu"), torch.float32, seed=0)
    pairs = make_pairs(model, geometry, 2, seed=0)
    assert pairs[0].image_inputs["pixel_values"].shape == (1, 5, 3, 336, 336)
    assert pairs[0].prompt_ids.count(geometry.image_token_id) == 2340
    assert len(pairs[0].prompt_ids) == 2340 + geometry.question_tokens
    processor = LlavaNextProcessor(
        image_processor=build_image_processor(SIZES["llava_next"]["7b"]),
        tokenizer=tiny_processor.tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    assert processor._get_num_multimodal_tokens(image_sizes=[[480, 640]])["num_image_tokens"] == [2340]
    # realistic, seeded answer lengths; pair i does not depend on how many pairs are made
    assert make_pairs(model, geometry, 1, seed=0)[0].chosen_ids == pairs[0].chosen_ids
    lengths = [len(p.chosen_ids) for p in make_pairs(model, geometry, 16, seed=0)]
    assert len(set(lengths)) > 8 and 60 < sorted(lengths)[8] < 300


def test_7b_config_and_flop_formula():
    """The 7b config is llava-v1.6-mistral-7b (7.57B parameters) and the formula's linears match the model's."""
    from transformers import LlavaNextForConditionalGeneration

    size = SIZES["llava_next"]["7b"]
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(build_config(size))
    n_params = sum(p.numel() for p in model.parameters())
    assert 7.50e9 < n_params < 7.60e9
    layer = model.model.language_model.layers[0]
    linear = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert linear == sum(i * o for i, o in text_linears(size))
    # one 640x480 pair: packing shares the image and prompt, so the step costs well under plain's
    p, c, r = 2340 + 40, 150, 150
    plain_seqs = [p + c, p + r]
    plain = step_flops(size, sum(plain_seqs), sum(n * (n + 1) // 2 for n in plain_seqs), sum(plain_seqs),
                             10, 16)
    packed = step_flops(size, p + c + r, (p + c) * (p + c + 1) // 2 + r * p + r * (r + 1) // 2, c + r, 5, 16)
    assert 0.5 < packed["total"] / plain["total"] < 0.6
    assert plain["lm_head"] / packed["lm_head"] > 10
    # ~2 x 7B frozen parameters x 2 (forward + input gradient) per token
    assert packed["linear"] / (p + c + r) == pytest.approx(4 * 6.98e9, rel=0.02)


def _inductor_works() -> bool:
    try:
        return bool(torch.compile(lambda x: x * 2 + 1)(torch.ones(4)).eq(3).all())
    except Exception:  # noqa: BLE001 - no C++ toolchain, or inductor unavailable here
        return False


def compiled_call(layer) -> bool:
    """Whether `nn.Module.compile` was called on the layer (torch keeps the compiled call here)."""
    return getattr(layer, "_compiled_call_impl", None) is not None


@pytest.mark.slow
def test_compiled_decoder_layers_give_the_same_packed_logps(asset_cache, tiny_pairs):
    from transformers import AutoModelForImageTextToText

    from vlm_orpo.data.packing import PackedCollator
    from vlm_orpo.modeling.compile import compile_decoder_layers, decoder_layers
    from vlm_orpo.modeling.shared_prefix import packed_logps, set_attention_backend

    if not _inductor_works():
        pytest.skip("torch.compile (inductor) does not work on this CPU")
    torch._dynamo.reset()
    encoder, pairs = tiny_pairs
    model = AutoModelForImageTextToText.from_pretrained(asset_cache["tiny_model"], dtype=torch.float32).eval()
    set_attention_backend(model, "sdpa")
    batch = PackedCollator(encoder.tokenizer.pad_token_id, encoder.image_token_id, 4000)(pairs[:3])
    keys = list(model.state_dict())
    with torch.no_grad():
        eager = packed_logps(model, batch)
        assert compile_decoder_layers(model) == len(decoder_layers(model)) == model.config.text_config.num_hidden_layers
        assert all(compiled_call(layer) for layer in decoder_layers(model))
        compiled = packed_logps(model, batch)
    assert list(model.state_dict()) == keys  # compiled in place: checkpoints and PEFT names unchanged
    torch.testing.assert_close(compiled.chosen, eager.chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.rejected, eager.rejected, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_decoder_layers_found_through_peft(asset_cache):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from vlm_orpo.modeling.compile import decoder_layers
    from vlm_orpo.modeling.families import family_for
    from vlm_orpo.modeling.load import lora_target_regex

    model = AutoModelForImageTextToText.from_pretrained(asset_cache["tiny_model"], dtype=torch.float32)
    layers = decoder_layers(model)
    peft_model = get_peft_model(
        model, LoraConfig(r=2, target_modules=lora_target_regex(model, family_for(model.config), "all-linear"))
    )
    assert decoder_layers(peft_model) is layers
    assert not any(compiled_call(layer) for layer in decoder_layers(peft_model))


def test_profile_aggregation_charges_gpu_kernels_to_model_parts():
    """The CUDA branch (not reachable on a CPU runner): kernels go to the part of the op that launched them,
    backward kernels to the forward op's part through the autograd sequence number, orphans separately."""
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType

    def cpu(name, parent=None, seq=-1, kernels=(), thread=1, fwd_thread=0, id=0):
        return NS(name=name, cpu_parent=parent, sequence_nr=seq, thread=thread, fwd_thread=fwd_thread,
                  device_type=DeviceType.CPU, kernels=[NS(name=k, duration=d) for k, d in kernels], id=id,
                  self_cpu_time_total=1.0)

    head = cpu("bench::lm_head", id=1)
    mm = cpu("aten::mm", head, seq=5, kernels=[("sm90_xmma_gemm_bf16bf16", 100.0)], id=2)
    root = cpu("autograd::engine::evaluate_function: MmBackward0", seq=5, fwd_thread=1, id=3)
    mm_bwd = cpu("aten::mm", cpu("MmBackward0", root, id=4), kernels=[("cutlass_80_tensorop_gemm", 200.0)], id=5)
    sdpa = cpu("aten::_efficient_attention_forward", cpu("bench::attention", id=6), seq=7,
               kernels=[("fmha_cutlassF_bf16_aligned", 40.0)], id=7)
    orphan = NS(name="triton_poi_fused_add_0", device_type=DeviceType.CUDA, linked_correlation_id=999,
                time_range=NS(start=0.0, end=60.0))
    out = aggregate_profile([head, mm, root, mm_bwd, sdpa, orphan], cuda=True, steps=1)
    parts = {k: v["s_per_step"] * 1e6 for k, v in out["by_part"].items()}
    assert parts == pytest.approx({"LM head": 300.0, "attention core + rope + reshapes": 40.0,
                                   "GPU kernels with no CPU op": 60.0})
    kinds = {k: v["s_per_step"] * 1e6 for k, v in out["by_op_kind"].items()}
    assert kinds == pytest.approx({"matmul": 300.0, "attention kernel": 40.0,
                                   "fused elementwise/reduction (triton)": 60.0})
    assert out["by_part_fwd_bwd"]["LM head [bwd]"]["share"] == pytest.approx(0.5)


def test_three_rejected_per_prompt_packed_vs_plain(tmp_path):
    """`--rejected-per-prompt 3`: plain runs 4 sequences a prompt, packed one group [P, C, R1, R2, R3]; the
    losses (mean over all 2 x 3 pairs) agree, and the packed step runs the image and prompt once per prompt."""
    paths = [str(REPO / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    cmd = [sys.executable, str(BENCH), "--size", "small", "--device", "cpu", "--pairs-per-step", "2",
           "--rejected-per-prompt", "3", "--variants", "plain,packed_pairs", "--steps", "1", "--warmup", "1",
           "--json", str(tmp_path / "r.json")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["rejected_per_prompt"] == [3] and len(report["pairs"][0]["more_rejected"]) == 2
    plain, packed = report["variants"]["plain_x2_k3"], report["variants"]["packed_pairs_x2_k3"]
    assert report["loss_check"]["ok"] and len(report["loss_check"]["details"]) == 2  # both against plain_logps
    assert packed["loss"] == pytest.approx(plain["loss"], rel=1e-4)
    assert len(packed["chosen_logp"]) == len(plain["rejected_logp"]) == 6
    assert (plain["images_per_step"], packed["images_per_step"]) == (8, 2)
    assert packed["rejected_per_prompt"] == 3 and packed["pairs_per_s"] == pytest.approx(6 / packed["median_s"])
    assert packed["tokens_per_step"] < plain["tokens_per_step"] / 2


def test_dpo_with_live_and_precomputed_reference_packed_vs_plain(tmp_path):
    """`--loss dpo`: plain runs the policy's two sequences and the reference's two more in each step (TRL's way),
    packed one row for each, and `_preref` reads reference log-probs computed before timing; all three losses
    agree with the oracle's, and the reference is the adapter-disabled model (so the loss is not log 2)."""
    paths = [str(REPO / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    cmd = [sys.executable, str(BENCH), "--size", "small", "--device", "cpu", "--pairs-per-step", "2", "--loss", "dpo",
           "--variants", "plain,packed_pairs", "--steps", "1", "--warmup", "1", "--json", str(tmp_path / "r.json")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["loss"] == "dpo" and "DPO" in report["config"]["timed"]
    variants = report["variants"]
    assert set(variants) == {"plain_x2", "packed_pairs_x2", "packed_pairs_x2_preref"}
    assert report["loss_check"]["ok"] and len(report["loss_check"]["details"]) == 3
    losses = [variants[name]["loss"] for name in sorted(variants)]
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-4)
    assert abs(losses[0] - math.log(2)) > 1e-3



@pytest.fixture(scope="module")
def family_run(tmp_path_factory):
    """Qwen2.5-VL (M-RoPE positions) and Gemma 3 (dense per-layer-type masks, sdpa only) at the small size, two
    pairs a step, in one several-family run."""
    out = tmp_path_factory.mktemp("families") / "r.json"
    paths = [str(REPO / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    cmd = [sys.executable, str(BENCH), "--family", "qwen2_5_vl", "gemma3", "--size", "small", "--device", "cpu",
           "--pairs-per-step", "2", "--variants", "plain,packed_sdpa,packed_pairs", "--steps", "1", "--warmup", "1",
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.mark.parametrize("family, packed", [("qwen2_5_vl", ["packed_sdpa_x2", "packed_pairs_x2"]),
                                            ("gemma3", ["packed_sdpa_x2"])])
def test_family_packed_and_plain_losses_agree(family_run, family, packed):
    """Each family runs its own code path (Qwen's M-RoPE, Gemma 3's masks); the losses agree with plain's and the
    oracle's; a backend the family lacks (Gemma 3: pairs) is a skip with the reason, and MFU says it leaves the
    vision tower out."""
    _, combined = family_run
    assert combined["complete"] and combined["machine"]["cpus"] and len(combined["load_avg_start"]) == 3
    report = combined["families"][family]
    assert report["config"]["family"] == family and report["loss_check"]["ok"]
    assert report["config"]["image_tokens"] == (252 if family == "qwen2_5_vl" else 256)
    assert "NOT counted" in report["config"]["mfu_flops"]
    plain = report["variants"]["plain_x2"]
    for name in packed:
        v = report["variants"][name]
        assert v["skipped"] is None and v["loss"] == pytest.approx(plain["loss"], rel=1e-4)
        assert v["chosen_logp"] == pytest.approx(plain["chosen_logp"], rel=1e-4)
        assert v["rejected_logp"] == pytest.approx(plain["rejected_logp"], rel=1e-4)
        assert v["tokens_per_step"] < plain["tokens_per_step"]
        assert (v["images_per_step"], plain["images_per_step"]) == (2, 4)
    if family == "gemma3":
        assert "supports the sdpa backend(s) only" in report["variants"]["packed_pairs_x2"]["skipped"]


def test_family_run_table_and_summary(family_run, tmp_path):
    proc, combined = family_run
    assert "| qwen2_5_vl | 2 | 252 |" in proc.stdout and "| gemma3 | 2 | 256 |" in proc.stdout
    path = tmp_path / "r.json"
    path.write_text(json.dumps(combined))
    table = summarize([str(path)])
    assert "r.json:qwen2_5_vl | qwen2_5_vl | packed_pairs_x2" in table and "r.json:gemma3 | gemma3 | plain_x2" in table


def test_every_family_small_layer_matches_the_flop_formula():
    """The formula's text linears (q, k, v, o, gate, up, down) are each family's decoder layer, at every size."""
    from transformers import AutoModelForImageTextToText

    from vlm_orpo.modeling.families import family_for

    for family, sizes in SIZES.items():
        for name, size in sizes.items():
            if name == "7b":  # the 7b configs are checked on their own below and above
                continue
            with torch.device("meta"):
                model = AutoModelForImageTextToText.from_config(build_config(size))
            assert family_for(model.config).name in (family, "llava")  # LLaVA-NeXT's entry is LLaVA's
            layers = model.get_decoder().layers
            assert len(layers) == size.text["num_hidden_layers"]
            linear = sum(m.weight.numel() for m in layers[0].modules() if isinstance(m, torch.nn.Linear))
            assert linear == sum(i * o for i, o in text_linears(size)), (family, name)


def test_qwen2_5_vl_7b_config_and_geometry():
    """The 7b config is Qwen2.5-VL-7B-Instruct (8.29B parameters), and a 1024x768 image is 999 merged tokens by the
    processor's rule and by the model's own count (on the 7b geometry with tiny widths)."""
    from transformers import AutoModelForImageTextToText

    size = SIZES["qwen2_5_vl"]["7b"]
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(build_config(size))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(8.292e9, rel=1e-3)
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size) == (3584, 28, 28, 4, 18944)
    assert (vision.depth, vision.hidden_size, vision.patch_size, vision.spatial_merge_size, vision.window_size,
            vision.fullatt_block_indexes) == (32, 1280, 14, 2, 112, [7, 15, 23, 31])
    layer = model.model.language_model.layers[0]
    linear = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert linear == sum(i * o for i, o in text_linears(size))
    patches = build_image_processor(size).get_number_of_image_patches(768, 1024, {})
    assert patches // 4 == 27 * 37 == 999  # resized to 756x1036: 54x74 patches, merged 2x2
    tiny = SIZES["qwen2_5_vl"]["7b-tiny"]
    pairs = make_pairs(build_model(tiny, torch.device("cpu"), torch.float32, seed=0), tiny, 1, seed=0)
    assert pairs[0].prompt_ids.count(tiny.image_token_id) == 999
    assert pairs[0].image_inputs["image_grid_thw"].tolist() == [[1, 54, 74]]
    assert pairs[0].prompt_token_inputs["mm_token_type_ids"].sum() == 999
