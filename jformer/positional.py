"""Positional information: sinusoidal, learned, rotary (RoPE) and ALiBi.

Self-attention is permutation-equivariant, so without one of these a
Transformer cannot tell token order. Sinusoidal and learned encodings are added
to the embeddings; RoPE rotates queries and keys so their dot product depends
on relative position; ALiBi adds a per-head linear distance penalty to the logits.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jformer.layers import check_ids, embed

Array = jax.Array

def sinusoidal_positions(T: int | Array, D: int, *, base: float = 10000.0) -> Array:
    """The paper's encoding [T, D]: PE[p, 2i] = sin(p / base^(2i/D)), PE[p, 2i+1] = cos(p / base^(2i/D)).

    ``T`` is a length (positions 0..T-1) or integer positions [..., T] (e.g. an
    offset window during cached decoding), giving [..., T, D].
    """
    if D % 2:
        raise ValueError(f"sinusoidal positions need an even width, got D={D}")
    positions = jnp.arange(T) if jnp.ndim(T) == 0 else jnp.asarray(T)
    pos = positions.astype(jnp.float32)[..., None]
    inv_freq = base ** (-jnp.arange(0, D, 2, dtype=jnp.float32) / D)
    angles = pos * inv_freq.reshape((1,) * (pos.ndim - 1) + (-1,))  # [..., T, D/2]
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(positions.shape + (D,))


def init_learned_positions(key: Array, max_len: int, D: int) -> dict:
    """Learned absolute positions: ``embedding`` [max_len, D] ~ N(0, 0.02²)."""
    return {"embedding": 0.02 * jax.random.normal(key, (max_len, D), jnp.float32)}


def check_table_length(what: str, length: int, max_len: int) -> None:
    """Raise unless ``length`` positions fit a learned table of ``max_len`` rows.

    Called where lengths are known (a batch, a cache size) because past the table a lookup
    inside ``jit`` could not raise (it gives NaN, ``learned_positions``).
    """
    if length > max_len:
        raise ValueError(f"{what} of {length} positions exceeds max_len={max_len} of learned positions")


def learned_positions(params: dict, positions: Array) -> Array:
    """Look up integer positions [...] -> [..., D]; a position outside [0, max_len) raises
    (concrete positions) or gives NaN (under ``jit``), as token ids do in ``layers.embed``."""
    check_ids("positions", positions, params["embedding"].shape[0])
    return embed(params, jnp.asarray(positions))


def rotary(x: Array, positions: Array, *, base: float = 10000.0) -> Array:
    """Rotary position embedding of heads x [..., T, N, H] at positions [T] or [..., T].

    Pairs (x_i, x_{i+H/2}) are rotated by angle p · base^(-2i/H), so that
    ⟨rotary(q, p), rotary(k, p')⟩ depends on p - p' only.
    """
    H = x.shape[-1]
    if H % 2:
        raise ValueError(f"rotary embeddings need an even head width, got H={H}")
    inv_freq = base ** (-jnp.arange(0, H, 2, dtype=jnp.float32) / H)
    angles = jnp.multiply.outer(jnp.asarray(positions, jnp.float32), inv_freq)  # [..., T, H/2]
    cos, sin = (jnp.expand_dims(f(angles), (*range(x.ndim - 1 - angles.ndim), -2)) for f in (jnp.cos, jnp.sin))  # head
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : H // 2], x32[..., H // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def alibi_slopes(num_heads: int) -> Array:
    """ALiBi head slopes [N]: the geometric sequence 2^(-8/n), 2^(-16/n), … (Press et al., 2022).

    For N not a power of two, the first 2^⌊log2 N⌋ slopes are followed by every
    other slope of the next power of two, as in the paper's reference code.
    """
    def powers(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    n = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = powers(n) + powers(2 * n)[0::2][: num_heads - n]
    return jnp.asarray(slopes, jnp.float32)


def alibi_bias(num_heads: int, q_positions: Array | int, k_positions: Array | int | None = None) -> Array:
    """ALiBi logits bias [..., N, T, S]: -m_n · |q_pos - k_pos|.

    Positions are [T] / [S] or batched [..., T] / [..., S]; ints mean ``arange``.
    """
    def as_positions(p):
        return jnp.arange(p) if isinstance(p, int) else jnp.asarray(p)

    q = as_positions(q_positions)
    k = q if k_positions is None else as_positions(k_positions)
    dist = jnp.abs(q[..., :, None] - k[..., None, :]).astype(jnp.float32)
    return -alibi_slopes(num_heads).reshape((1,) * (dist.ndim - 2) + (-1, 1, 1)) * dist[..., None, :, :]
