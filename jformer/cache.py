"""The key/value cache of incremental decoding: buffer layout, write, read.

One self-attention layer's cache is ``{"key", "value"}`` [..., K, S_max, H], heads
first: the per-head products read it as stored. A decoded token writes its rows in
place (``update_kv_cache``); queries then attend to every slot, and causality over
the index hides the slots not written yet. The model-level caches (one per layer,
plus the index and the padding of the cached keys) are built by ``jformer.decoding``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def init_kv_cache(batch_shape: tuple[int, ...], max_len: int, num_kv_heads: int, head_dim: int,
                  dtype=jnp.float32) -> dict:
    """Empty self-attention cache: ``{"key", "value"}`` zeros [*batch_shape, K, max_len, H].

    Heads first, the layout the per-head products read: stored as [..., S_max, K, H],
    every decoded token would transpose the whole cache for its attention.
    """
    shape = (*batch_shape, num_kv_heads, max_len, head_dim)
    # Two buffers, not one shared: a cache may be donated to a jitted step.
    return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}


def update_kv_cache(cache: dict, k: Array, v: Array, index: Array | int) -> dict:
    """Write k, v [..., T, K, H] into the cache [..., K, S_max, H] at positions index..index+T-1.

    ``index`` may be traced (``lax.dynamic_update_slice``); like it, an index
    past S_max - T is clamped, so callers size the cache for the whole sequence.
    """
    def write(buf, x):
        return jax.lax.dynamic_update_slice_in_dim(buf, heads_first(x).astype(buf.dtype), index, buf.ndim - 2)

    return {"key": write(cache["key"], k), "value": write(cache["value"], v)}


def heads_first(x: Array) -> Array:
    """[..., S, K, H] <-> [..., K, S, H] (the cache's layout; its own inverse)."""
    return jnp.swapaxes(x, -3, -2)



def read_kv_cache(cache: dict) -> tuple[Array, Array]:
    """Keys and values [..., S_max, K, H] of every slot (a view of the heads-first buffers)."""
    return heads_first(cache["key"]), heads_first(cache["value"])
