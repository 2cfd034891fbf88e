"""The attention backends of the packed forward: the one list that the config checks and the forward reads.

- sdpa: a dense boolean [T, T] mask; works everywhere, with a backward on CPU and GPU.
- flex: a FlexAttention BlockMask that skips fully masked blocks; CUDA (no CPU backward in torch 2.13).
- auto: flex on CUDA, sdpa elsewhere.
"""

ATTN_BACKENDS = ("auto", "sdpa", "flex")
