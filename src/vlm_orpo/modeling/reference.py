"""The plain forward that TRL, LLaMA-Factory and ms-swift do: `[prompt+chosen]` and `[prompt+rejected]` as two
sequences, each with its own image, and full-sequence logits. The packed forward is tested and benchmarked
against it; training and evaluation never use it.
"""

from __future__ import annotations

import torch

from vlm_orpo.data.packing import EncodedPair, collate_image_inputs
from vlm_orpo.losses import PairLogps
from vlm_orpo.modeling.shared_prefix import token_logps


def plain_batch(pairs: list[EncodedPair], pad_token_id: int) -> tuple[dict, list[tuple[int, int]]]:
    """2N right-padded sequences (all chosen, then all rejected) and each one's (prompt, answer) lengths."""
    seqs, spans = [], []
    for answer in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            ids = getattr(p, answer)
            seqs.append(p.prompt_ids + ids)
            spans.append((len(p.prompt_ids), len(ids)))
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
    images = collate_image_inputs([p.image_inputs for p in pairs] * 2)
    return {"input_ids": input_ids, "attention_mask": attention_mask, **images}, spans


def plain_logps(model, pairs: list[EncodedPair], pad_token_id: int) -> PairLogps:
    batch, spans = plain_batch(pairs, pad_token_id)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(**batch, use_cache=False).logits
    sums = []
    for i, (P, A) in enumerate(spans):
        answer = batch["input_ids"][i, P : P + A]
        sums.append(token_logps(logits[i, P - 1 : P + A - 1], answer).sum())
    sums = torch.stack(sums).view(2, len(pairs))
    lengths = torch.tensor([a for _, a in spans], dtype=sums.dtype, device=sums.device).view(2, len(pairs))
    return PairLogps(chosen_sum=sums[0], rejected_sum=sums[1], chosen_tokens=lengths[0], rejected_tokens=lengths[1])
