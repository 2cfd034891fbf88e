"""The "pairs" attention backend: each pair's queries meet only the keys the shared-prefix rule allows them.

A packed row's dense mask makes SDPA pay for the whole row squared, mostly for query/key pairs that belong to
different preference pairs. Here each layer makes two SDPA calls for all prefix groups of the batch together
(a group is a prompt with its chosen and k rejected answers; k = 1 for a pair), so no [T, T] mask is built and
SDPA's fused kernels do only each group's own work (linear in the number of groups and answers):

- prompt + chosen queries over the group's prompt + chosen keys: plain causal (`is_causal`, no mask);
- each rejected answer's queries over its group's prompt + that answer's keys: causal aligned at the bottom
  right, a small [rejected answers, 1, rejected, prompt + rejected] mask, so a rejected answer never sees chosen
  or another rejected answer.

The groups and answers are gathered out of the packed rows into right-padded batches (right padding keeps
causal attention exact: a real query never reaches a pad key; answers of very different lengths pay for the
padding to the longest) and the outputs are gathered back into row order; padding tokens of a row get zeros
(nothing reads them). `packed_logps` hands the layout to every attention call as the `pair_layout` keyword, which
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
    """Where each group's tokens sit, as indices into the rows' tokens flattened to [rows * T]; built once a step."""

    prompt_chosen: torch.Tensor  # [groups, longest P + C]: the prompt and chosen tokens, right-padded
    rejected_queries: torch.Tensor  # [rejected answers, longest R]: each rejected answer's tokens, right-padded
    rejected_keys: torch.Tensor  # [rejected answers, longest P + R]: its prompt then its tokens, right-padded
    rejected_mask: torch.Tensor  # [rejected answers, 1, longest R, longest P + R] bool: token r sees keys 0..P + r
    source: torch.Tensor  # [rows * T]: each token's place in the two calls' outputs (flattened, then one zero row)


def pair_layout(pair_index: torch.Tensor, span: torch.Tensor) -> PairLayout:
    """The layout of a packed batch (`data.packing`: each group contiguous as P, C, R1..Rk, `span` the answer
    number; padding has pair_index -1).

    Padded slots point at a real token of the same group, so every gathered value is finite and no mask row is
    empty; their outputs are never read back."""
    group, answer = pair_index.flatten(), span.flatten()
    device = group.device
    tokens = torch.arange(group.numel(), device=device)
    real = group >= 0
    n, answers = int(group.max()) + 1, int(answer.max()) + 1  # answers: prompt, chosen, rejected 1..k
    counts = torch.bincount(group[real] * answers + answer[real], minlength=n * answers).view(n, answers)
    first = torch.full((n,), group.numel(), device=device).scatter_reduce(0, group[real], tokens[real], "amin")
    P, C, at = counts[:, Part.PROMPT, None], counts[:, Part.CHOSEN, None], first[:, None]
    lengths = counts[:, Part.REJECTED :]  # [groups, k]: each rejected answer's length, 0 where a group has fewer
    starts = P + C + lengths.cumsum(1) - lengths  # [groups, k]: where each rejected answer starts in its group
    g, j = (lengths > 0).nonzero(as_tuple=True)  # the rejected answers, group by group
    number = torch.zeros_like(lengths).index_put_((g, j), torch.arange(g.numel(), device=device))
    # per group [groups, 1] or per rejected answer [answers, 1] against per slot [length]
    Pa, R, S, at_a = P[g], lengths[g, j, None], starts[g, j, None], at[g]
    longest_pc, longest_r, longest_pr = int((P + C).max()), int(R.max()), int((Pa + R).max())
    pc, r, k = (torch.arange(length, device=device) for length in (longest_pc, longest_r, longest_pr))
    k_real = torch.minimum(k, Pa + R - 1)
    # each token's slot: prompt and chosen in the first call's output, rejected in the second's, padding the zero row
    owner = group.clamp_min(0)
    offset = tokens - first[owner]
    i = (answer - Part.REJECTED).clamp_min(0)
    rejected_slot = n * longest_pc + number[owner, i] * longest_r + offset - starts[owner, i]
    slot = torch.where(answer >= Part.REJECTED, rejected_slot, owner * longest_pc + offset)
    return PairLayout(
        prompt_chosen=at + torch.minimum(pc, P + C - 1),
        rejected_queries=at_a + S + torch.minimum(r, R - 1),
        rejected_keys=at_a + k_real + torch.where(k_real >= Pa, S - Pa, 0),  # the prompt, then the answer's own
        rejected_mask=(k <= (Pa + r)[:, :, None])[:, None],
        source=torch.where(real, slot, n * longest_pc + g.numel() * longest_r),
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
