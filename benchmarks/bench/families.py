"""Every benchmarked model family in one place: how its model and images are built (`Family`) and its sizes
(`Size`: random-weight configs and the image geometry), so `geometry` builds all of them with one code path.

Sizes: `small` for every family on the packed path, at the scale of LLaVA-NeXT's small config (text d=128,
2 layers, 4/2 heads of 32, MLP 448, vocab 2048; vision width 64, 2 layers; 190-320 image tokens), with each
family's real patch, merge and crop rules scaled down; `7b` (and `7b-tiny`, the 7b image geometry with tiny
widths, to check it on a CPU) for LLaVA-NeXT and Qwen2.5-VL.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
HALF = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


@dataclass(frozen=True)
class Family:
    """How a family's model and image inputs are made, beyond its configs."""

    image_processor: str  # "module.Class" under transformers.models: the PIL backends (no torchvision needed)
    image_token_key: str  # the config keyword that holds the image token id
    token_inputs: tuple[str, ...] = ()  # processor outputs with one value per prompt token: 1 on image tokens
    clip_vision: bool = False  # the FLOP formula's vision term is CLIP's: counted for this family only


@dataclass(frozen=True)
class Size:
    family: str
    description: str
    text: dict  # text config keywords (`model_type` picks the class)
    vision: dict  # vision config keywords
    image_token_id: int
    image_hw: tuple[int, int]  # (height, width) of every benchmark image
    processor: dict  # image processor keywords
    config: dict = field(default_factory=dict)  # the family's other config keywords (special token ids, grids, ...)
    question_tokens: int = 40  # text tokens of the prompt; image tokens come on top
    answer_median: int = 32
    answer_sigma: float = 0.5  # lognormal sigma of the answer lengths
    answer_range: tuple[int, int] = (8, 128)
    default_pairs_per_step: tuple[int, ...] = (1, 4, 8)

    @property
    def reserved_ids(self) -> list[int]:
        """Token ids that random text must not draw: the image token and the family's other special tokens."""
        ids = {self.image_token_id} | {v for k, v in self.config.items() if k.endswith(("_token_id", "_token_index"))}
        return sorted(ids)


FAMILIES = {
    "llava_next": Family("llava_next.image_processing_pil_llava_next.LlavaNextImageProcessorPil", "image_token_index",
                         clip_vision=True),
    "llava_onevision": Family("llava_onevision.image_processing_pil_llava_onevision.LlavaOnevisionImageProcessorPil",
                              "image_token_index"),
    "internvl": Family("got_ocr2.image_processing_pil_got_ocr2.GotOcr2ImageProcessorPil", "image_token_id"),
    "mistral3": Family("pixtral.image_processing_pil_pixtral.PixtralImageProcessorPil", "image_token_index"),
    "qwen2_vl": Family("qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil", "image_token_id",
                       ("mm_token_type_ids",)),
    "qwen2_5_vl": Family("qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil", "image_token_id",
                         ("mm_token_type_ids",)),
    "qwen3_vl": Family("qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil", "image_token_id",
                       ("mm_token_type_ids",)),
    "gemma3": Family("gemma3.image_processing_pil_gemma3.Gemma3ImageProcessorPil", "image_token_index",
                     ("token_type_ids",)),
    "idefics3": Family("idefics3.image_processing_pil_idefics3.Idefics3ImageProcessorPil", "image_token_id"),
    "smolvlm": Family("smolvlm.image_processing_pil_smolvlm.SmolVLMImageProcessorPil", "image_token_id"),
}

# --- LLaVA-NeXT (llava-v1.6-mistral-7b) ------------------------------------------------------------------------

_MISTRAL_7B = dict(
    model_type="mistral",
    vocab_size=32064,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    sliding_window=None,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_CLIP_L_336 = dict(
    model_type="clip_vision_model",
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    num_channels=3,
)


def _llava_next(pinpoints: list, crop: int, patch: int) -> tuple[dict, dict]:
    """(config, image processor) keywords of LLaVA-NeXT 1.6 (llava-hf/llava-v1.6-mistral-7b-hf) at a crop size."""
    config = dict(image_grid_pinpoints=pinpoints, vision_feature_layer=-2, vision_feature_select_strategy="default",
                  projector_hidden_act="gelu", tie_word_embeddings=False, image_seq_length=(crop // patch) ** 2)
    processor = dict(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop},
                     image_grid_pinpoints=pinpoints, resample=3, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                     do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                     do_convert_rgb=True, do_pad=True)  # resample 3: bicubic
    return config, processor


_LLAVA_7B_CONFIG, _LLAVA_7B_PROCESSOR = _llava_next([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                                                    336, 14)
_SMALL_PINPOINTS = [[112, 224], [224, 112], [224, 224], [336, 112], [112, 336]]
_LLAVA_SMALL_CONFIG, _LLAVA_SMALL_PROCESSOR = _llava_next(_SMALL_PINPOINTS, 112, 14)

_LLAVA_7B = Size(
    family="llava_next",
    description="llava-v1.6-mistral-7b architecture (Mistral-7B + CLIP ViT-L/14-336, anyres), random weights",
    text=_MISTRAL_7B,
    vision=_CLIP_L_336,
    image_token_id=32000,
    image_hw=(480, 640),
    processor=_LLAVA_7B_PROCESSOR,
    config=_LLAVA_7B_CONFIG,
    answer_median=150,
    answer_range=(16, 512),
    default_pairs_per_step=(1,),
)

# --- Qwen2.5-VL-7B-Instruct -------------------------------------------------------------------------------------

_QWEN_PROCESSOR = dict(patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=56 * 56,
                       max_pixels=28 * 28 * 16384, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
_QWEN_7B = Size(
    family="qwen2_5_vl",
    description="Qwen2.5-VL-7B-Instruct architecture (Qwen2 7B text, 32-block windowed ViT, 28 px a merged token), "
                "random weights",
    text=dict(model_type="qwen2_5_vl_text", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
              num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
              rms_norm_eps=1e-6, use_sliding_window=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
              pad_token_id=0,  # the ids of `make_pairs`' token stream, as every size's
              rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                tokens_per_second=2, hidden_act="silu", in_channels=3),
    image_token_id=151655,
    image_hw=(768, 1024),  # smart_resize to 756x1036: 27x37 = 999 merged tokens
    processor=_QWEN_PROCESSOR,
    config=dict(video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
                tie_word_embeddings=False),
    answer_median=150,
    answer_range=(16, 512),
    default_pairs_per_step=(1,),
)

# --- small: every family at LLaVA-NeXT small's scale ------------------------------------------------------------

_SMALL_TEXT = dict(vocab_size=2048, hidden_size=128, intermediate_size=448, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, max_position_embeddings=8192, tie_word_embeddings=False,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
_SMALL_VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
_QWEN_SMALL_VISION = dict(depth=2, hidden_size=64, intermediate_size=256, num_heads=2, out_hidden_size=128,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
_QWEN_IDS = dict(video_token_id=2001, vision_start_token_id=2002, vision_end_token_id=2003)
_MROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}  # 16 = head_dim / 2
_IMAGE = (384, 512)  # 1024x768 / 2: Qwen's 28 px a token gives 14x18 = 252 tokens
_PIXTRAL = dict(image_size=512, patch_size=14, head_dim=32, model_type="pixtral")


def _small(family: str, description: str, text: dict, vision: dict, processor: dict, config: dict | None = None,
           image_hw: tuple[int, int] = _IMAGE) -> Size:
    return Size(family=family, description=description + " at LLaVA-NeXT small's scale, random weights",
                text=dict(_SMALL_TEXT, **text), vision=vision, image_token_id=2000, image_hw=image_hw,
                processor=processor, config=config or {})


_SMALL = [
    Size(
        family="llava_next",
        description="LLaVA-NeXT structure scaled down for CPU (d=128, 2 layers, 2048 vocab; ViT 112px/14, 2 layers)",
        text=dict(_MISTRAL_7B, vocab_size=2048, hidden_size=128, intermediate_size=448, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192),
        vision=dict(_CLIP_L_336, image_size=112, patch_size=14, projection_dim=64, **_SMALL_VISION),
        image_token_id=2000,
        image_hw=(160, 213),  # 640x480 scaled by 1/3: 2x2 grid + base image, unpadded like the 7b's
        processor=_LLAVA_SMALL_PROCESSOR,
        config=_LLAVA_SMALL_CONFIG,
    ),
    _small("llava_onevision", "LLaVA-OneVision (SigLIP 112px/14 crops, anyres_max_9, Qwen2)",
           dict(model_type="qwen2", use_sliding_window=False),
           dict(model_type="siglip_vision_model", image_size=112, patch_size=14, vision_use_head=False,
                **_SMALL_VISION),
           dict(size={"height": 112, "width": 112}, image_grid_pinpoints=_SMALL_PINPOINTS, do_pad=True, **HALF),
           dict(image_grid_pinpoints=_SMALL_PINPOINTS, vision_feature_select_strategy="full", vision_feature_layer=-1,
                vision_aspect_ratio="anyres_max_9", video_token_index=2001, tie_word_embeddings=False),
           image_hw=(160, 213)),
    _small("internvl", "InternVL (InternViT 224px/14 tiles, pixel shuffle 0.5, up to 4 tiles + thumbnail, Qwen2)",
           dict(model_type="qwen2", use_sliding_window=False),
           dict(image_size=[224, 224], patch_size=[14, 14], use_mean_pooling=False, **_SMALL_VISION),
           dict(size={"height": 224, "width": 224}, crop_to_patches=True, min_patches=1, max_patches=4,
                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
           dict(image_seq_length=64, downsample_ratio=0.5, vision_feature_layer=-1,
                vision_feature_select_strategy="default", tie_word_embeddings=False)),
    _small("mistral3", "Mistral 3 (Pixtral, 14 px patches merged 2x2, Mistral)",
           dict(model_type="mistral", sliding_window=None),
           dict(_PIXTRAL, **_SMALL_VISION),
           dict(size={"longest_edge": 512}, patch_size=14, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD),
           dict(spatial_merge_size=2, vision_feature_layer=-1, tie_word_embeddings=False)),
    _small("qwen2_vl", "Qwen2-VL (ViT 14 px patches merged 2x2, M-RoPE)",
           dict(model_type="qwen2_vl_text", rope_parameters=_MROPE),
           dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=4, hidden_size=128, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2, in_channels=3),
           _QWEN_PROCESSOR, _QWEN_IDS),
    _small("qwen2_5_vl", "Qwen2.5-VL (windowed ViT 14 px patches merged 2x2, M-RoPE)",
           dict(model_type="qwen2_5_vl_text", rope_parameters=_MROPE),
           dict(_QWEN_SMALL_VISION, window_size=112, fullatt_block_indexes=[1], tokens_per_second=2, hidden_act="silu"),
           _QWEN_PROCESSOR, _QWEN_IDS),
    _small("qwen3_vl", "Qwen3-VL (ViT 16 px patches merged 2x2, deepstack, interleaved M-RoPE)",
           dict(model_type="qwen3_vl_text",
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5],
                                 "mrope_interleaved": True}),
           dict(_QWEN_SMALL_VISION, patch_size=16, num_position_embeddings=2304, deepstack_visual_indexes=[0],
                hidden_act="gelu_pytorch_tanh"),
           dict(_QWEN_PROCESSOR, patch_size=16, **HALF), _QWEN_IDS),
    # the window (128) is shorter than a row, so it cuts into every pair as in a long prompt at full scale
    _small("gemma3", "Gemma 3 (SigLIP 224px/14, 256 image tokens, sliding window 128 + full layer)",
           dict(model_type="gemma3_text", query_pre_attn_scalar=32, layer_types=["sliding_attention", "full_attention"],
                sliding_window=128, tie_word_embeddings=True),
           dict(model_type="siglip_vision_model", image_size=224, patch_size=14, vision_use_head=False,
                **_SMALL_VISION),
           dict(size={"height": 224, "width": 224}, do_pan_and_scan=False, **HALF),
           dict(mm_tokens_per_image=256, boi_token_index=2001, eoi_token_index=2002, tie_word_embeddings=True)),
    *(
        _small(name, f"{label} (SigLIP 224px/14 crops, pixel shuffle 2: 2x2 crops + global image, Llama)",
               dict(model_type="llama"),
               dict(image_size=224, patch_size=14, **_SMALL_VISION),
               dict(size={"longest_edge": 448}, max_image_size={"longest_edge": 224}, do_image_splitting=True,
                    do_pad=True, **HALF),
               dict(scale_factor=2, tie_word_embeddings=False))
        for name, label in (("idefics3", "Idefics3"), ("smolvlm", "SmolVLM"))
    ),
]

SIZES: dict[str, dict[str, Size]] = {family: {} for family in FAMILIES}
for _size in _SMALL:
    SIZES[_size.family]["small"] = _size
SIZES["llava_next"]["7b"] = _LLAVA_7B
SIZES["llava_next"]["7b-tiny"] = replace(
    _LLAVA_7B,
    description="7b input geometry (640x480 -> 2340 image tokens, answers ~150) with tiny widths, for CPU checks",
    text=dict(_MISTRAL_7B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1, head_dim=32),
    vision=dict(_CLIP_L_336, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    image_token_id=500,
)
SIZES["qwen2_5_vl"]["7b"] = _QWEN_7B
SIZES["qwen2_5_vl"]["7b-tiny"] = replace(
    _QWEN_7B,
    description="7b input geometry (1024x768 -> 999 image tokens, answers ~150) with tiny widths, for CPU checks",
    text=dict(_QWEN_7B.text, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1, rope_parameters=_MROPE),
    vision=dict(_QWEN_7B.vision, depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                fullatt_block_indexes=[1]),
    image_token_id=500,
    config=dict(_QWEN_7B.config, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503),
)


def size_of(family: str, size: str) -> Size:
    if family not in SIZES:
        raise SystemExit(f"unknown family {family!r}; choose from {', '.join(SIZES)}")
    if size not in SIZES[family]:
        raise SystemExit(f"family {family} has no size {size!r}; it has {', '.join(SIZES[family])}")
    return SIZES[family][size]
