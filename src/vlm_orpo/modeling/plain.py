"""The plain forward that TRL, LLaMA-Factory and ms-swift do: `[prompt+chosen]` and `[prompt+rejected]` as two
sequences, each with its own image. It trains every model the packed forward does not support (no family
entry, or recurrent layers), and it is the oracle the packed forward is tested and benchmarked against.
"""

from __future__ import annotations

from vlm_orpo.data.packing import TOKEN_INPUTS, EncodedPair, PlainCollator, move_batch
from vlm_orpo.losses import PairLogps
from vlm_orpo.modeling.logps import answer_logps


def plain_logps(model, batch: dict) -> PairLogps:
    """Per-pair summed answer log-probs of a `PlainCollator` batch already on the model's device."""
    outputs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        logits_to_keep=batch["logits_to_keep"],
        use_cache=False,
        **{key: batch[key] for key in TOKEN_INPUTS if key in batch},
        **batch["images"],
    )
    return answer_logps(outputs.logits, batch)


def plain_pair_logps(model, pairs: list[EncodedPair], pad_token_id: int, image_token_id: int = -1,
                     sft_on_prompt: bool = False) -> PairLogps:
    """The plain forward of encoded pairs, collated and moved here: the tests' oracle in one call."""
    device = next(model.parameters()).device
    batch = PlainCollator(pad_token_id, image_token_id, sft_on_prompt)(pairs)
    return plain_logps(model, move_batch(batch, device))
