"""Independent reference implementations the tests compare jformer with (and the benchmarks time).

They share no code with jformer: a bug there cannot hide in both.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def einsum_attention(q, k, v, *, mask=None, is_causal=False):
    """All heads in one einsum: q [B, T, N, H], k/v [B, S, N, H], mask [B|1, N|1, T, S] -> [B, T, N, H].

    The independent peer of ``jformer.attention.attend`` (no vmap, no shared code).
    """
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    if is_causal:
        T, S = q.shape[1], k.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((T, S), bool)), logits, -1e30)
    if mask is not None:
        logits = jnp.where(mask, logits, -1e30)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", weights, v)
