"""The attention backends of the packed forward: the one list that the config checks and the forward reads.

- sdpa: a dense boolean [T, T] mask; works everywhere, with a backward on CPU and GPU. It pays for every
  masked-out query/key pair of the row, so several pairs in one row cost more than one pair per row.
- flex: a FlexAttention BlockMask that skips fully masked blocks; CUDA (no CPU backward in torch 2.13).
- pairs: two SDPA calls a layer over each prompt's own tokens, its chosen and each rejected answer
  (`modeling.attention`), no [T, T] mask; exact, with a backward on CPU and GPU.
- auto: flex on CUDA, pairs elsewhere (the fastest exact one measured there).
"""

import logging

log = logging.getLogger(__name__)

ATTN_BACKENDS = ("auto", "sdpa", "flex", "pairs")


def packs_pairs(backend: str) -> bool:
    """Whether packing several pairs into a row cannot lose with this resolved backend (`attention_backend`).

    Dense SDPA pays for the row squared, so it gets one pair per row; flex and pairs skip other pairs' keys."""
    if backend not in ATTN_BACKENDS or backend == "auto":
        raise ValueError(f"packs_pairs needs a resolved backend (sdpa, flex or pairs), got {backend!r}")
    return backend != "sdpa"


def row_cap(max_tokens_per_row: int | None, backend: str) -> int | None:
    """The packing cap the collator gets: the configured one where packing cannot lose, else a pair per row."""
    if max_tokens_per_row is not None and not packs_pairs(backend):
        log.info("attention %s pays for every masked pair of a row: one pair per row (data.max_tokens_per_row "
                 "applies with the pairs or flex backend)", backend)
        return None
    return max_tokens_per_row
