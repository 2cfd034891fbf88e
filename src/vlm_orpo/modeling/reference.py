"""The plain forward that TRL, LLaMA-Factory and ms-swift do: `[prompt+chosen]` and `[prompt+rejected]` as two
sequences, each with its own image, and full-sequence logits. The packed forward is tested and benchmarked
against it; training and evaluation never use it.
"""

from __future__ import annotations

import torch

from vlm_orpo.data.packing import EncodedPair, collate_image_inputs
from vlm_orpo.losses import PairLogps
from vlm_orpo.modeling.shared_prefix import token_logps


def plain_batch(pairs: list[EncodedPair], pad_token_id: int) -> tuple[dict, dict]:
    """2N right-padded sequences (all chosen, then all rejected) and where their answer tokens sit.

    The second dict holds, for every answer token of every sequence, its sequence (`rows`), the position that
    predicts it (`cols`) and its id (`ids`), plus each sequence's answer length (`lengths`): one flat index, so
    the log-probs come from one gather over the logits (a slice per sequence would cost one logits-sized
    gradient buffer per sequence in backward). Built apart from the forward so a benchmark can time only that.
    """
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
    rows = torch.cat([torch.full((A,), i) for i, (_, A) in enumerate(spans)])
    cols = torch.cat([torch.arange(P - 1, P + A - 1) for P, A in spans])
    answers = {"rows": rows, "cols": cols, "ids": input_ids[rows, cols + 1],
               "lengths": torch.tensor([A for _, A in spans])}
    images = collate_image_inputs([p.image_inputs for p in pairs] * 2)
    return {"input_ids": input_ids, "attention_mask": attention_mask, **images}, answers


def plain_batch_logps(model, batch: dict, answers: dict) -> PairLogps:
    """Per-pair summed answer log-probs of a `plain_batch` already on the model's device."""
    logits = model(**batch, use_cache=False).logits  # [2N, width, vocab]
    logps = token_logps(logits[answers["rows"], answers["cols"]], answers["ids"])
    lengths = answers["lengths"].to(logps.dtype)
    sums = torch.zeros_like(lengths).index_add(0, answers["rows"], logps).view(2, -1)
    lengths = lengths.view(2, -1)
    return PairLogps(chosen_sum=sums[0], rejected_sum=sums[1], chosen_tokens=lengths[0], rejected_tokens=lengths[1])


def plain_logps(model, pairs: list[EncodedPair], pad_token_id: int) -> PairLogps:
    """Per-pair summed answer log-probs of the plain two-sequence forward: the oracle the packed one is tested by."""
    device = next(model.parameters()).device
    batch, answers = ({k: v.to(device) for k, v in part.items()} for part in plain_batch(pairs, pad_token_id))
    return plain_batch_logps(model, batch, answers)
