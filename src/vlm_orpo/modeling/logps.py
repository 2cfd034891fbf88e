"""From a forward's kept logits to per-pair answer log-probs: the part the packed and plain forwards share."""

from __future__ import annotations

import torch

from vlm_orpo.data.packing import Part
from vlm_orpo.losses import PairLogps

_LOGSOFTMAX_CHUNK = 2048  # target tokens per fp32 log-softmax chunk


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per row of [N, vocab] logits, in fp32 chunks so no [N, vocab] fp32 copy exists at once."""
    out = []
    for start in range(0, logits.shape[0], _LOGSOFTMAX_CHUNK):
        chunk = logits[start : start + _LOGSOFTMAX_CHUNK].float()
        tgt = targets[start : start + _LOGSOFTMAX_CHUNK, None]
        out.append(chunk.gather(-1, tgt).squeeze(-1) - torch.logsumexp(chunk, dim=-1))
    return torch.cat(out)


def answer_logps(logits: torch.Tensor, batch: dict) -> PairLogps:
    """Summed log-probs per pair and part, from the [rows, kept, vocab] logits of a collated batch.

    One gather over the logits for all targets: a slice per sequence would cost one logits-sized gradient
    buffer per sequence in backward."""
    logps = token_logps(logits[batch["target_row"], batch["target_col"]], batch["target_ids"])
    counts = batch["segment_tokens"]
    sums = torch.zeros(counts.numel(), dtype=logps.dtype, device=logps.device)
    return sums_to_pair_logps(sums.index_add(0, batch["target_segment"], logps).view(-1, len(Part)), counts)


def sums_to_pair_logps(sums: torch.Tensor, counts: torch.Tensor) -> PairLogps:
    """PairLogps from [pairs, len(Part)] log-prob sums and token counts (`segment_tokens`)."""
    has_prompt = bool(counts[:, Part.PROMPT].any())  # the collator scored the prompt's text (sft_on_prompt)
    return PairLogps(
        chosen_sum=sums[:, Part.CHOSEN],
        rejected_sum=sums[:, Part.REJECTED],
        chosen_tokens=counts[:, Part.CHOSEN].to(sums.dtype),
        rejected_tokens=counts[:, Part.REJECTED].to(sums.dtype),
        prompt_sum=sums[:, Part.PROMPT] if has_prompt else None,
        prompt_tokens=counts[:, Part.PROMPT].to(sums.dtype) if has_prompt else None,
    )
