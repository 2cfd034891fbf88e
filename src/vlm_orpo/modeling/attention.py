"""The "pairs" attention backend: each pair's queries meet only the keys the shared-prefix rule allows them.

A packed row's dense mask makes SDPA pay for the whole row squared, mostly for query/key pairs that belong to
different preference pairs. Here each layer makes two SDPA calls for all pairs of the batch together, so no
[T, T] mask is built and SDPA's fused kernels do only each pair's own work (linear in the number of pairs):

- prompt + chosen queries over the pair's prompt + chosen keys: plain causal (`is_causal`, no mask);
- rejected queries over the pair's prompt + rejected keys: causal aligned at the bottom right, a small
  [pairs, 1, rejected, prompt + rejected] mask, so rejected never sees chosen.

The pairs are gathered out of the packed rows into right-padded per-pair batches (right padding keeps causal
attention exact: a real query never reaches a pad key; pairs of very different lengths pay for the padding to
the longest) and the outputs are gathered back into row order; padding tokens of a row get zeros (nothing reads
them). `packed_logps` hands the layout to every attention call as the `pair_layout` keyword, which
transformers passes from the model's forward through each decoder layer, gradient checkpointing and PEFT
included. Without a layout (generation, plain forwards) this is exactly SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from vlm_orpo.data.packing import Part

IMPLEMENTATION = "vlm_orpo_pairs"  # the name under transformers' attention and mask interfaces


@dataclass
class PairLayout:
    """Where each pair's tokens sit, as indices into the rows' tokens flattened to [rows * T]; built once a step."""

    prompt_chosen: torch.Tensor  # [pairs, longest P + C]: the prompt and chosen tokens, right-padded
    rejected_queries: torch.Tensor  # [pairs, longest R]: the rejected tokens, right-padded
    rejected_keys: torch.Tensor  # [pairs, longest P + R]: the prompt then the rejected tokens, right-padded
    rejected_mask: torch.Tensor  # [pairs, 1, longest R, longest P + R] bool: rejected token r sees keys 0..P + r
    source: torch.Tensor  # [rows * T]: each token's place in the two calls' outputs (flattened, then one zero row)


def pair_layout(pair_index: torch.Tensor, span: torch.Tensor) -> PairLayout:
    """The layout of a packed batch (`data.packing`: each pair contiguous as P, C, R; padding has pair_index -1).

    Padded slots point at a real token of the same pair, so every gathered value is finite and no mask row is
    empty; their outputs are never read back."""
    pair, part = pair_index.flatten(), span.flatten()
    device = pair.device
    tokens = torch.arange(pair.numel(), device=device)
    real = pair >= 0
    n = int(pair.max()) + 1
    counts = torch.bincount(pair[real] * len(Part) + part[real], minlength=n * len(Part)).view(n, len(Part))
    first = torch.full((n,), pair.numel(), device=device).scatter_reduce(0, pair[real], tokens[real], "amin")
    # per pair [n, 1] against per slot [length]
    P, C, R, at = (x[:, None] for x in (*counts.unbind(1), first))
    longest_pc, longest_r, longest_pr = torch.cat([P + C, R, P + R], dim=1).amax(dim=0).tolist()
    pc, r, k = (torch.arange(length, device=device) for length in (longest_pc, longest_r, longest_pr))
    k_real = torch.minimum(k, P + R - 1)
    # each token's slot: prompt and chosen in the first call's output, rejected in the second's, padding the zero row
    owner = pair.clamp_min(0)
    offset = tokens - first[owner]
    rejected_slot = n * longest_pc + owner * longest_r + offset - (P + C)[owner, 0]
    slot = torch.where(part == Part.REJECTED, rejected_slot, owner * longest_pc + offset)
    return PairLayout(
        prompt_chosen=at + torch.minimum(pc, P + C - 1),
        rejected_queries=at + P + C + torch.minimum(r, R - 1),
        rejected_keys=at + k_real + torch.where(k_real >= P, C, 0),  # the prompt, then past chosen to rejected
        rejected_mask=(k <= (P + r)[:, :, None])[:, None],
        source=torch.where(real, slot, n * (longest_pc + longest_r)),
    )


def pairs_attention(module, query, key, value, attention_mask, pair_layout: PairLayout | None = None, **kwargs):
    """transformers' attention signature: query [rows, heads, T, dim], key/value [rows, kv heads, T, dim] in,
    [rows, T, heads, dim] out, as `sdpa_attention_forward` (which does GQA, scaling and dropout for both calls)."""
    if pair_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows, heads, T, dim = query.shape
    q, k, v = (x.transpose(1, 2).flatten(0, 1) for x in (query, key, value))  # [rows * T, heads, dim]

    def attend(queries, keys, mask):
        out, _ = sdpa_attention_forward(
            module, q[queries].transpose(1, 2), k[keys].transpose(1, 2), v[keys].transpose(1, 2), mask,
            is_causal=True, **kwargs,  # is_causal applies only where mask is None
        )
        return out.flatten(0, 1)  # [pairs * length, heads, dim]

    out = torch.cat([
        attend(pair_layout.prompt_chosen, pair_layout.prompt_chosen, None),
        attend(pair_layout.rejected_queries, pair_layout.rejected_keys, pair_layout.rejected_mask),
        query.new_zeros(1, heads, dim),
    ])
    return out[pair_layout.source].view(rows, T, heads, dim), None


AttentionInterface.register(IMPLEMENTATION, pairs_attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # without a layout, SDPA's masks
