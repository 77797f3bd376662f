"""Boolean attention masks and the shape checks of attention inputs.

Masks are boolean and ``True`` means "may attend". Masked keys never contribute,
not even a NaN or inf in their keys or values (logits are masked with ``where``,
and the values of keys that no query may see are zeroed). A row with no ``True``
(a query that may see nothing, e.g. a left-pad position) gets zero weights and a
zero output: finite in every dtype, and it never falls back to keys its mask
forbids (a uniform fallback would let a causal row read future keys).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Finite stand-in for -inf, so that a fully masked row's softmax has no 0/0 (NaN) to hide.
MASKED = float(jnp.finfo(jnp.float32).min)


def causal_mask(T: int, S: int | None = None, *, offset: int = 0) -> Array:
    """Causal mask [T, S]: query i may attend key j iff j <= i + offset.

    ``offset`` = S - T aligns the last query with the last key, as when T new
    queries follow S - T cached keys.
    """
    S = T if S is None else S
    return jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + offset


def padding_mask(lengths: Array, S: int) -> Array:
    """Key padding mask [B, 1, 1, S] from valid lengths [B]: key j valid iff j < length.

    Concrete lengths outside [0, S] raise: longer would silently mean "all valid".
    """
    if not isinstance(lengths, jax.core.Tracer):
        a = np.asarray(lengths)
        bad = a[(a < 0) | (a > S)]
        if bad.size:
            raise ValueError(f"lengths {bad.tolist()} are outside [0, S={S}] (lengths {a.shape})")
    return (jnp.arange(S) < jnp.asarray(lengths)[:, None])[:, None, None, :]


def padding_mask_from_ids(ids: Array, pad_id: int) -> Array:
    """Key padding mask [B, 1, 1, S] from token ids [B, S]: valid iff id != pad_id."""
    return (ids != pad_id)[:, None, None, :]


def combine_masks(*masks: Array | None) -> Array | None:
    """Logical AND of broadcastable boolean masks, skipping ``None`` (all-None gives None)."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out


def apply_mask(logits: Array, values: Array, mask: Array | None,
                zero_unseen_values: bool = True) -> tuple[Array, Array]:
    """Masked float32 logits [..., T, S] and values [..., S, Hv] whose unseen keys are zero.

    ``where`` rather than an additive bias: NaN + bias is still NaN, so garbage in a
    masked key (an unused cache slot, a padded position) would poison every row. The
    values of keys that no query may see are zeroed because their weight, exactly 0,
    times a NaN value is NaN too.
    """
    if mask is None:
        return logits, values
    if zero_unseen_values:
        seen = mask.any(-2)[..., None]  # [..., S, 1]: some query may attend this key
        values = jnp.where(seen, values, jnp.zeros((), values.dtype))
    return jnp.where(mask, logits, MASKED), values


# ------------------------------------------------------------------- validation


def check_float(**arrays: Array) -> None:
    for name, x in arrays.items():
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def check_broadcast(name: str, x: Array | None, target: tuple[int, ...], target_desc: str) -> None:
    if x is None:
        return
    try:
        ok = jnp.broadcast_shapes(tuple(x.shape), target) == tuple(target)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} of shape {tuple(x.shape)} is not broadcastable to {target_desc} = {tuple(target)}"
        )


def check_mask(mask: Array | None, target: tuple[int, ...], target_desc: str) -> None:
    if mask is not None and mask.dtype != jnp.bool_:
        raise TypeError(
            f"mask must be boolean (True = may attend), got dtype {mask.dtype}; "
            "pass additive masks as bias"
        )
    check_broadcast("mask", mask, target, target_desc)


def check_heads(q: Array, k: Array, v: Array, mask: Array | None,
                 bias: Array | None) -> tuple[tuple[int, ...], int, int, int, int]:
    """Validate multi-head q [..., T, N, H], k, v [..., S, K, H], mask and bias; return (lead, T, S, N, K)."""
    check_float(q=q, k=k, v=v)
    for name, x, axes in (("q", q, "[..., T, N, H]"), ("k", k, "[..., S, K, H]"), ("v", v, "[..., S, K, H]")):
        if x.ndim < 3:
            raise ValueError(f"{name} must be {axes} (at least 3-D), got shape {tuple(x.shape)}")
    N, K = q.shape[-2], k.shape[-2]
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head widths differ: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if N % K:
        raise ValueError(f"key/value heads K={K} (k {tuple(k.shape)}) do not divide "
                         f"query heads N={N} (q {tuple(q.shape)})")
    lead, T, S = q.shape[:-3], q.shape[-3], k.shape[-3]
    if k.shape[:-3] != lead:
        raise ValueError(f"q {tuple(q.shape)} and k, v {tuple(k.shape)} must have the same leading "
                         f"(batch) axes [..., T|S, N|K, H]")
    target = (*lead, N, T, S)
    check_mask(mask, target, "[..., N, T, S]")
    check_broadcast("bias", bias, target, "[..., N, T, S]")
    return lead, T, S, N, K

