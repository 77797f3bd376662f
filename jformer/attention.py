"""Attention: softmax(Q Kᵀ / √H) V, its multi-head form, and boolean masks.

Shape legend (used in every docstring of jformer): B batch, T query length,
S key/value length, D model width, N query heads, K key/value heads,
G = N / K query heads per key/value head, H head width, F feed-forward width,
V vocabulary, L layers. ``...`` is any number of leading batch axes.

Masks are boolean and ``True`` means "may attend". Masked keys never contribute,
not even a NaN or inf in their keys or values (logits are masked with ``where``,
and the values of keys that no query may see are zeroed). A row with no ``True``
(a query that may see nothing, e.g. a left-pad position) gets zero weights and a
zero output: finite in every dtype, and it never falls back to keys its mask
forbids (a uniform fallback would let a causal row read future keys).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jformer import positional
from jformer.layers import check_size, dense, init_dense

Array = jax.Array
Implementation = Literal["xla", "cudnn", "blockwise"] | None

# Finite stand-in for -inf, so that a fully masked row's softmax has no 0/0 (NaN) to hide.
_MASKED = float(jnp.finfo(jnp.float32).min)


# --------------------------------------------------------------------------- masks


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


def _apply_mask(logits: Array, values: Array, mask: Array | None,
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
    return jnp.where(mask, logits, _MASKED), values


# ------------------------------------------------------------------- validation


def _check_float(**arrays: Array) -> None:
    for name, x in arrays.items():
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def _check_broadcast(name: str, x: Array | None, target: tuple[int, ...], target_desc: str) -> None:
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


def _check_mask(mask: Array | None, target: tuple[int, ...], target_desc: str) -> None:
    if mask is not None and mask.dtype != jnp.bool_:
        raise TypeError(
            f"mask must be boolean (True = may attend), got dtype {mask.dtype}; "
            "pass additive masks as bias"
        )
    _check_broadcast("mask", mask, target, target_desc)


def _check_heads(q: Array, k: Array, v: Array, mask: Array | None,
                 bias: Array | None) -> tuple[tuple[int, ...], int, int, int, int]:
    """Validate multi-head q [..., T, N, H], k, v [..., S, K, H], mask and bias; return (lead, T, S, N, K)."""
    _check_float(q=q, k=k, v=v)
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
    _check_mask(mask, target, "[..., N, T, S]")
    _check_broadcast("bias", bias, target, "[..., N, T, S]")
    return lead, T, S, N, K


# ------------------------------------------------------------- single-head core


def scaled_dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    key: Array | None = None,
    return_weights: bool = False,
    zero_unseen_values: bool = True,
) -> Array | tuple[Array, Array]:
    """One attention head: ``softmax(q kᵀ · scale + bias, where mask) v``.

    Args:
      q: queries [..., T, H].
      k: keys [..., S, H].
      v: values [..., S, Hv].
      mask: boolean, broadcastable to [..., T, S]; True = may attend.
      bias: additive logits bias broadcastable to [..., T, S] (ALiBi, relative positions).
      is_causal: also apply ``causal_mask(T, S)`` (query i sees keys j <= i).
      scale: logit scale, default 1/√H.
      dropout_rate: dropout on the attention weights, applied only if ``key`` is given.
      key: PRNG key for dropout; ``None`` means deterministic.
      return_weights: also return the softmax weights [..., T, S] (before dropout).
      zero_unseen_values: zero the values of keys that no query may see, so that a NaN
        there cannot enter the output as 0 · NaN. The KV-cache path turns it off: its
        unwritten slots are zeros by construction, and the ``where`` would copy the
        whole cache at every decoded token.

    Returns:
      out [..., T, Hv], and the weights [..., T, S] if ``return_weights``; a query whose
      mask row is all False gets zero weights and a zero output.

    Logits, masking and softmax run in float32 whatever the input dtype.
    """
    _check_float(q=q, k=k, v=v)
    for name, x, axes in (("q", q, "[..., T, H]"), ("k", k, "[..., S, H]"), ("v", v, "[..., S, Hv]")):
        if x.ndim < 2:
            raise ValueError(f"{name} must be {axes} (at least 2-D), got shape {tuple(x.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head widths differ: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v lengths differ: k {tuple(k.shape)}, v {tuple(v.shape)}")
    T, S = q.shape[-2], k.shape[-2]
    try:
        lead = jnp.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        raise ValueError(f"the leading (batch) axes of q {tuple(q.shape)}, k {tuple(k.shape)} and "
                         f"v {tuple(v.shape)} do not broadcast ([..., T, H], [..., S, H], [..., S, Hv])") from None
    logits_shape = lead + (T, S)
    _check_mask(mask, logits_shape, "[..., T, S]")
    _check_broadcast("bias", bias, logits_shape, "[..., T, S]")

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = jnp.einsum("...th,...sh->...ts", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    mask = combine_masks(mask, causal_mask(T, S) if is_causal else None)
    logits, v = _apply_mask(logits, v, mask, zero_unseen_values)
    weights = jax.nn.softmax(logits, axis=-1)
    if mask is not None:  # an empty row is zeros, not uniform over keys it may not see
        weights = jnp.where(mask.any(-1, keepdims=True), weights, 0.0)
    probs = weights
    if key is not None and dropout_rate > 0.0:
        keep = jax.random.bernoulli(key, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("...ts,...sh->...th", probs.astype(v.dtype), v)
    return (out, weights) if return_weights else out


# --------------------------------------------------------------- multi-head


def init_multi_head_attention(
    key: Array,
    d_model: int,
    num_heads: int,
    *,
    num_kv_heads: int | None = None,
    kv_features: int | None = None,
    head_dim: int | None = None,
    out_features: int | None = None,
    use_bias: bool = True,
    std: float | None = None,
    out_std: float | None = None,
) -> dict:
    """Parameters of multi-head attention (Flax ``MultiHeadDotProductAttention`` layout).

    ``query`` kernel [D, N, H], ``key``/``value`` kernels [Dkv, K, H], ``out``
    kernel [N, H, Dout]; biases likewise. H defaults to D / N, K to N (multi-head),
    K = 1 is multi-query and 1 < K < N grouped-query attention.

    Kernels are Glorot uniform, or N(0, std²) for query/key/value and N(0, out_std²)
    for ``out`` (``out_std`` defaults to ``std``): GPT-2 shrinks the projection that
    writes into the residual stream (see ``blocks.init_stds``).
    """
    out_std = std if out_std is None else out_std
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    for name, value in (("d_model", d_model), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                        ("kv_features", kv_features), ("head_dim", head_dim), ("out_features", out_features)):
        if value is not None:
            check_size(name, value)
    if head_dim is None:
        if d_model % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide d_model={d_model}")
        head_dim = d_model // num_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} does not divide num_heads={num_heads}")
    kv_features = d_model if kv_features is None else kv_features
    out_features = d_model if out_features is None else out_features
    kq, kk, kv, ko = jax.random.split(key, 4)
    return {
        "query": init_dense(kq, d_model, (num_heads, head_dim), use_bias=use_bias, std=std),
        "key": init_dense(kk, kv_features, (num_kv_heads, head_dim), use_bias=use_bias, std=std),
        "value": init_dense(kv, kv_features, (num_kv_heads, head_dim), use_bias=use_bias, std=std),
        "out": init_dense(ko, (num_heads, head_dim), out_features, use_bias=use_bias, std=out_std),
    }


def project_qkv(
    params: dict, inputs_q: Array, inputs_kv: Array | None = None
) -> tuple[Array, Array, Array]:
    """Project inputs into heads: q [..., T, N, H], k and v [..., S, K, H].

    ``inputs_q`` [..., T, D]; ``inputs_kv`` [..., S, Dkv] (cross-attention) or
    ``None`` (self-attention: K and V come from ``inputs_q``).
    """
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    _check_float(inputs_q=inputs_q)
    d_q = params["query"]["kernel"].shape[0]
    if inputs_q.shape[-1] != d_q:
        raise ValueError(f"inputs_q width {inputs_q.shape[-1]} (shape {tuple(inputs_q.shape)}) "
                         f"does not match the query kernel input width {d_q}")
    if inputs_q.shape[:-2] != inputs_kv.shape[:-2]:
        raise ValueError(f"inputs_q {tuple(inputs_q.shape)} and inputs_kv {tuple(inputs_kv.shape)} "
                         "have different batch axes")
    if inputs_kv is inputs_q and _fusable_qkv(params):
        # Self-attention: one [D, (N + 2K)·H] matmul reads x once, and its backward
        # is one input-gradient dot instead of three dots and two sums.
        fused = {name: jnp.concatenate([params[n][name] for n in _QKV], axis=-2)
                 for name in params["query"]}
        qkv = dense(fused, inputs_q)  # [..., T, N + 2K, H]
        N, K = params["query"]["kernel"].shape[-2], params["key"]["kernel"].shape[-2]
        return qkv[..., :N, :], qkv[..., N:N + K, :], qkv[..., N + K:, :]
    return (dense(params["query"], inputs_q), *project_kv(params, inputs_kv))


_QKV = ("query", "key", "value")


def _fusable_qkv(params: dict) -> bool:
    """Whether the query, key and value kernels [D, ·, H] and biases concatenate along the head axis."""
    return (len({(params[n]["kernel"].shape[0], params[n]["kernel"].shape[-1]) for n in _QKV}) == 1
            and len({frozenset(params[n]) for n in _QKV}) == 1)


def project_kv(params: dict, inputs_kv: Array) -> tuple[Array, Array]:
    """Project keys and values only: inputs_kv [..., S, Dkv] -> k, v [..., S, K, H].

    For attending many times to one fixed memory (cross-attention while decoding):
    project once, then pass ``(k, v)`` as ``inputs_kv`` of ``multi_head_attention``.
    """
    _check_float(inputs_kv=inputs_kv)
    d_kv = params["key"]["kernel"].shape[0]
    if inputs_kv.shape[-1] != d_kv:
        raise ValueError(f"inputs_kv width {inputs_kv.shape[-1]} (shape {tuple(inputs_kv.shape)}) "
                         f"does not match the key/value kernel input width {d_kv}")
    return dense(params["key"], inputs_kv), dense(params["value"], inputs_kv)


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


def _split_head_axis(x: Array | None, N: int, K: int) -> tuple[Array | None, int | None]:
    """View a mask/bias [..., N|1, T, S] as [..., K, G, T, S]; returns it and its head axis."""
    if x is None or x.ndim < 3 or x.shape[-3] == 1:
        return (x if x is None or x.ndim < 3 else jnp.squeeze(x, -3)), None
    return x.reshape(x.shape[:-3] + (K, N // K) + x.shape[-2:]), -4


def attend(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
    dropout_rate: float = 0.0,
    key: Array | None = None,
    return_weights: bool = False,
    implementation: Implementation = None,
    zero_unseen_values: bool = True,
) -> tuple[Array, Array | None]:
    """Attention of every head: ``scaled_dot_product_attention`` vmapped over heads.

    Args:
      q: [..., T, N, H]; k, v: [..., S, K, H] with N a multiple of K (query head
        n reads key/value head n // G).
      mask, bias: broadcastable to [..., N, T, S] (use a size-1 head axis to share).
      implementation: ``None`` for the vmapped reference (supports dropout and
        weights); ``"xla"`` or ``"cudnn"`` to run ``jax.nn.dot_product_attention``;
        ``"blockwise"`` for ``blockwise_attention`` (O(T) memory).
      zero_unseen_values: as in ``scaled_dot_product_attention``.

    Returns:
      out [..., T, N, H] and weights [..., N, T, S] (``None`` unless requested).
    """
    lead, T, S, N, K = _check_heads(q, k, v, mask, bias)

    if implementation is not None:
        if return_weights or (key is not None and dropout_rate > 0.0):
            raise ValueError(f"implementation={implementation!r} supports neither attention "
                             "dropout nor returned weights; use implementation=None")
        if implementation == "blockwise":
            return blockwise_attention(q, k, v, mask=mask, bias=bias, is_causal=is_causal,
                                       zero_unseen_values=zero_unseen_values), None
        return _attend_fused(q, k, v, mask, bias, is_causal, implementation, zero_unseen_values), None

    G = N // K
    # vmap over heads inside, over the leading (batch) axes outside, so that the per-head
    # products batch as [*lead, K, G] (a vmapped axis becomes the first batch axis): a
    # heads-first cache [B, K, S, H] is then read as it is stored, not transposed per token.
    mask, bias = _lead_broadcast(mask, lead), _lead_broadcast(bias, lead)
    keys = None
    if key is not None and dropout_rate > 0.0:
        keys = jax.random.split(key, math.prod(lead) * N).reshape(lead + (K, G))

    def one_head(q1, k1, v1, m, b, kk):
        return scaled_dot_product_attention(
            q1, k1, v1, mask=m, bias=b, is_causal=is_causal, dropout_rate=dropout_rate,
            key=kk, return_weights=True, zero_unseen_values=zero_unseen_values)

    def inner(a):  # a head axis at `a` for the per-group vmap, else None
        return None if a is None else a + 1

    def heads(q1, k1, v1, m, b, kk):  # q1 [T, N, H], k1, v1 [S, K, H], m, b [N|1, T, S]
        qg = q1.reshape(q1.shape[:-2] + (K, G, q1.shape[-1]))  # [T, K, G, H]
        m, m_axis = _split_head_axis(m, N, K)
        b, b_axis = _split_head_axis(b, N, K)
        k_axis = None if kk is None else 0
        # Inner vmap: the G query heads that share one key/value head.
        per_group = jax.vmap(one_head, in_axes=(-2, None, None, inner(m_axis), inner(b_axis), k_axis),
                             out_axes=(-2, -3))
        # Outer vmap: the K key/value heads.
        return jax.vmap(per_group, in_axes=(-3, -2, -2, m_axis, b_axis, k_axis), out_axes=(-3, -4))(
            qg, k1, v1, m, b, kk)

    for _ in lead:
        heads = jax.vmap(heads, in_axes=(0, 0, 0, None if mask is None else 0, None if bias is None else 0,
                                         None if keys is None else 0))
    out, weights = heads(q, k, v, mask, bias, keys)
    out = out.reshape(q.shape[:-1] + (v.shape[-1],))
    weights = weights.reshape(weights.shape[:-4] + (N, T, S)) if return_weights else None
    return out, weights


def _lead_broadcast(x: Array | None, lead: tuple[int, ...]) -> Array | None:
    """A mask/bias broadcastable to [*lead, N|1, T, S] as [*lead, N|1, T', S'] (its T', S' may be 1)."""
    if x is None:
        return None
    x = x.reshape((1,) * (3 - x.ndim) + x.shape) if x.ndim < 3 else x
    return jnp.broadcast_to(x, lead + x.shape[-3:])

# ------------------------------------------------------- memory-efficient path


def blockwise_attention(q: Array, k: Array, v: Array, *, mask: Array | None = None,
                        bias: Array | None = None, is_causal: bool = False, scale: float | None = None,
                        block_q: int = 256, block_k: int = 256, zero_unseen_values: bool = True) -> Array:
    """Exact multi-head attention that never stores the [T, S] weights (flash attention).

    The same ``softmax(q kᵀ · scale + bias, where mask) v`` as ``attend``, computed
    per block of ``block_q`` queries by visiting ``block_k`` keys at a time with an
    online softmax: running row max m, normaliser l and unnormalised output a,

        m' = max(m, rowmax(s_j)),   l' = e^(m - m') l + Σ e^(s_j - m'),
        a' = e^(m - m') a + e^(s_j - m') v_j,           out = a / l,

    so memory is O(T · block_k) per head instead of O(T · S). With ``is_causal``
    (query i sees keys j <= i) key blocks wholly after a query block are skipped,
    about half the work. Differentiable by a custom VJP that recomputes each block's
    weights from the saved log-sum-exp, so the backward pass is O(T) memory too;
    ``bias`` gets its gradient (as large as the bias), ``mask`` none. The backward
    pass halves the blocks until one [B, N, bq, bk] float32 tile fits in cache
    (``_BACKWARD_TILE`` elements): its five products and elementwise passes over a
    tile then read it from cache, not memory.

    Args:
      q: [..., T, N, H]; k, v: [..., S, K, H] (N a multiple of K: grouped-query heads).
      mask: boolean broadcastable to [..., N, T, S], True = may attend.
      bias: additive, broadcastable to [..., N, T, S].
      is_causal, scale: as in ``scaled_dot_product_attention``.
      block_q, block_k: block sizes (clipped to T and S; T, S need not divide).
      zero_unseen_values: as in ``scaled_dot_product_attention``.

    Returns:
      [..., T, N, H]. A row without any allowed key is zeros, as in ``attend``.
    """
    lead, T, S, N, K = _check_heads(q, k, v, mask, bias)
    H = q.shape[-1]
    bq, bk = min(block_q, T), min(block_k, S)
    Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk

    # Internal layout: heads first, [B, N, T|S, H]. Grouped key/value heads are repeated
    # to N (their gradients sum back through the repeat): a separate size-G axis would
    # make XLA:CPU copy every [T, S] block into another layout, about 30% slower.
    def heads_first(x, length):
        x = x.reshape((-1,) + x.shape[-3:])
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
        return jnp.moveaxis(x, 1, -2)

    if zero_unseen_values and (mask is not None or (is_causal and S > T)):
        # Values of keys no query may see are zeroed (a 0 weight times a NaN value is NaN),
        # from the mask as given: never its [T, S] broadcast, which blockwise exists to avoid.
        seen = jnp.ones((S,), bool) if mask is None else mask.reshape((1,) * (3 - mask.ndim) + mask.shape).any((-3, -2))
        seen = combine_masks(seen, jnp.arange(S) < T) if is_causal else seen
        v = jnp.where(seen[..., None, None], v, jnp.zeros((), v.dtype))
    qh = heads_first(q, Tp)
    kh, vh = (jnp.repeat(heads_first(x, Sp), N // K, axis=1) for x in (k, v))
    mask4 = _blocks_view(mask, lead, T, S, Tp, Sp, False)
    bias4 = _blocks_view(None if bias is None else bias.astype(jnp.float32), lead, T, S, Tp, Sp, 0.0)
    scale = 1.0 / math.sqrt(H) if scale is None else scale
    opts = _FlashOpts(is_causal, scale, bq, bk, S, Sp != S,
                      _backward_blocks(qh.shape[0] * N, bq, bk))
    out = _flash(qh, kh, vh, mask4, bias4, opts)
    out = jnp.moveaxis(out, 1, 2)[:, :T]
    return out.reshape(q.shape).astype(q.dtype)


class _FlashOpts(NamedTuple):
    """Static options of ``_flash``: block sizes of the forward pass and of the backward pass."""
    is_causal: bool
    scale: float
    bq: int
    bk: int
    S: int  # the true key length
    padded_keys: bool  # keys at positions >= S are padding up to a whole block
    backward_blocks: tuple[int, int]


# Elements of one [B, N, bq, bk] float32 tile in the backward pass (2 MiB). Measured on a
# 2-core EPYC (attention forward + backward, forward blocks 256 x 256): lm-small's shapes
# (B·N = 128, T = 256, H = 32) are fastest with backward blocks 64 x 64 (-27%; 32 x 32 and
# 128 x 128 gain less), lm-medium's (B·N = 64, T = 512, H = 64) with 64 x 128 (-16%), and
# B·N = 8 at T = 4096 with 256 x 256; s2s-small's train step (T = 64) was slower with 32 x 32.
_BACKWARD_TILE = 1 << 19
_MIN_BACKWARD_BLOCK = 64  # smaller blocks: per-block loop overhead outweighs the cache


def _backward_blocks(rows: int, bq: int, bk: int) -> tuple[int, int]:
    """Halve bq (or bk, when smaller) while ``rows`` · bq · bk exceeds ``_BACKWARD_TILE``.

    Halves of a block still tile the padded lengths; an odd block or the minimum stops.
    """
    def halvable(b):
        return b % 2 == 0 and b // 2 >= _MIN_BACKWARD_BLOCK

    while rows * bq * bk > _BACKWARD_TILE and (halvable(bq) or halvable(bk)):
        if halvable(bq) and (bq >= bk or not halvable(bk)):
            bq //= 2
        else:
            bk //= 2
    return bq, bk


def _blocks_view(x, lead, T, S, Tp, Sp, fill):
    """A mask/bias broadcastable to [*lead, N, T, S] as [B|1, N|1, Tp|1, Sp|1], padded to blocks."""
    if x is None:
        return None
    x = x.reshape((1,) * (len(lead) + 3 - x.ndim) + x.shape)
    xl = x.shape[:-3]
    x = (x.reshape((1,) + x.shape[-3:]) if all(d == 1 for d in xl)
         else jnp.broadcast_to(x, lead + x.shape[-3:]).reshape((-1,) + x.shape[-3:]))
    pad_t = Tp - T if x.shape[2] == T and T > 1 else 0
    pad_s = Sp - S if x.shape[3] == S and S > 1 else 0
    return jnp.pad(x, ((0, 0),) * 2 + ((0, pad_t), (0, pad_s)), constant_values=fill)


def _slice(x, axis, start, size):
    """Block [start, start + size) of ``axis``, or x itself where that axis is broadcast (size 1)."""
    return x if x.shape[axis] == 1 else jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _block_logits(qi, kj, mask4, bias4, i, j, opts, *, transposed=False):
    """Float32 logits [B, N, bq, bk] of query block i against key block j, masked.

    ``transposed`` gives them as [B, N, bk, bq] (keys by queries), computed as k qᵀ.
    """
    is_causal, scale, bq, bk, S = opts.is_causal, opts.scale, opts.bq, opts.bk, opts.S
    if transposed:
        s = jnp.einsum("bnsh,bnth->bnst", kj, qi, preferred_element_type=jnp.float32) * scale
    else:
        s = jnp.einsum("bnth,bnsh->bnts", qi, kj, preferred_element_type=jnp.float32) * scale
    orient = (lambda x: jnp.swapaxes(x, -1, -2)) if transposed else (lambda x: x)
    if bias4 is not None:
        s = s + orient(_slice(_slice(bias4, 2, i * bq, bq), 3, j * bk, bk))
    q_pos = i * bq + jnp.arange(bq)[:, None]
    k_pos = j * bk + jnp.arange(bk)[None, :]
    allowed = None if mask4 is None else _slice(_slice(mask4, 2, i * bq, bq), 3, j * bk, bk)
    if is_causal:
        allowed = combine_masks(allowed, k_pos <= q_pos)
    if opts.padded_keys:  # keys padded up to the block size are not keys at all
        allowed = combine_masks(allowed, k_pos < S)
    if allowed is not None:
        # -inf, not _MASKED: a masked logit's weight is then exactly 0 even in a row with no
        # allowed key (the running max stays at its _MASKED start), so such a row sums to
        # l = 0 and is output as zeros; `where` keeps a NaN key from reaching the sums.
        s = jnp.where(orient(allowed), s, -jnp.inf)
    return s


def _num_key_blocks(i, opts, n_k):
    bq, bk = opts.bq, opts.bk
    return jnp.minimum(n_k, ((i + 1) * bq - 1) // bk + 1) if opts.is_causal else n_k


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(qh, kh, vh, mask4, bias4, opts):
    return _flash_fwd(qh, kh, vh, mask4, bias4, opts)[0]


def _flash_fwd(qh, kh, vh, mask4, bias4, opts):
    bq, bk = opts.bq, opts.bk
    n_q, n_k = qh.shape[2] // bq, kh.shape[2] // bk

    def query_block(i):
        qi = jax.lax.dynamic_slice_in_dim(qh, i * bq, bq, 2)

        def visit(j, carry):
            m, l, acc = carry
            s = _block_logits(qi, jax.lax.dynamic_slice_in_dim(kh, j * bk, bk, 2), mask4, bias4, i, j, opts)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            vj = jax.lax.dynamic_slice_in_dim(vh, j * bk, bk, 2)
            acc = correction[..., None] * acc + jnp.einsum("bnts,bnsh->bnth", p.astype(vh.dtype), vj,
                                                           preferred_element_type=jnp.float32)
            return m_new, correction * l + p.sum(-1), acc

        shape = qi.shape[:-1]
        init = (jnp.full(shape, _MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(qi.shape, jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, _num_key_blocks(i, opts, n_k), visit, init)
        empty = l == 0.0  # no allowed key: output 0, and lse = +inf makes its backward weights 0
        return (acc / jnp.where(empty, 1.0, l)[..., None],
                jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l))))

    out, lse = jax.lax.map(query_block, jnp.arange(n_q))  # [n_q, B, N, bq, (H)]
    out = jnp.moveaxis(out, 0, 2).reshape(qh.shape).astype(qh.dtype)
    lse = jnp.moveaxis(lse, 0, 2).reshape(qh.shape[:-1])
    return out, (qh, kh, vh, mask4, bias4, out, lse)


def _flash_bwd(opts, res, d_out):
    qh, kh, vh, mask4, bias4, out, lse = res
    bq, bk = opts.backward_blocks
    opts = opts._replace(bq=bq, bk=bk)
    is_causal, scale = opts.is_causal, opts.scale
    n_q, n_k = qh.shape[2] // bq, kh.shape[2] // bk
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out.astype(jnp.float32), -1)  # Σ_h dO · O = Σ_s P · dP, per query

    # Every block is worked keys-by-queries (Pᵀ, dSᵀ [B, N, bk, bq]) and dQ is accumulated
    # transposed ([B, N, H, T]): then each of the five products contracts the last axis of
    # its left operand, the only form XLA:CPU hands to its fast (YNNPACK) dot; in the
    # queries-by-keys form dV = Pᵀ dO and dK = dSᵀ Q fall back to a kernel 3-4x slower.
    def key_block(carry, j):
        dq_t, dbias = carry
        kj = jax.lax.dynamic_slice_in_dim(kh, j * bk, bk, 2)
        vj = jax.lax.dynamic_slice_in_dim(vh, j * bk, bk, 2)
        kj_t = jax.lax.optimization_barrier(jnp.swapaxes(kj, -1, -2))  # kept as a real [H, bk] copy

        def visit(i, inner):
            dk, dv, dq_t, dbias = inner
            qi = jax.lax.dynamic_slice_in_dim(qh, i * bq, bq, 2)
            d_oi = jax.lax.dynamic_slice_in_dim(d_out, i * bq, bq, 2)
            s_t = _block_logits(qi, kj, mask4, bias4, i, j, opts, transposed=True)
            p_t = jnp.exp(s_t - jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, 2)[..., None, :])
            dv = dv + jnp.einsum("bnst,bnth->bnsh", p_t, d_oi)
            dp_t = jnp.einsum("bnsh,bnth->bnst", vj, d_oi, preferred_element_type=jnp.float32)
            ds_t = p_t * (dp_t - jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, 2)[..., None, :])
            dk = dk + jnp.einsum("bnst,bnth->bnsh", ds_t, qi) * scale
            dq_ti = jax.lax.dynamic_slice_in_dim(dq_t, i * bq, bq, 3)
            dq_t = jax.lax.dynamic_update_slice_in_dim(
                dq_t, dq_ti + jnp.einsum("bnhs,bnst->bnht", kj_t, ds_t) * scale, i * bq, 3)
            if dbias is not None:
                dbias = _add_block(dbias, jnp.swapaxes(ds_t, -1, -2), i * bq, j * bk)
            return dk, dv, dq_t, dbias

        start = (j * bk) // bq if is_causal else 0
        zeros = jnp.zeros(kj.shape, jnp.float32)
        dk, dv, dq_t, dbias = jax.lax.fori_loop(start, n_q, visit, (zeros, zeros, dq_t, dbias))
        return (dq_t, dbias), (dk, dv)

    dbias0 = None if bias4 is None else jnp.zeros(bias4.shape, jnp.float32)
    dq_t0 = jnp.zeros(qh.shape[:2] + (qh.shape[3], qh.shape[2]), jnp.float32)
    (dq_t, dbias), (dk, dv) = jax.lax.scan(key_block, (dq_t0, dbias0), jnp.arange(n_k))
    dq = jnp.swapaxes(dq_t, -1, -2)
    dk = jnp.moveaxis(dk, 0, 2).reshape(kh.shape)
    dv = jnp.moveaxis(dv, 0, 2).reshape(vh.shape)
    return (dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None,
            None if bias4 is None else dbias.astype(bias4.dtype))


def _add_block(total, block, t0, s0):
    """Add a [B, N, bq, bk] block into a broadcast-shaped total, summing its broadcast axes."""
    axes = tuple(a for a in range(4) if total.shape[a] == 1 and block.shape[a] != 1)
    block = block.sum(axes, keepdims=True)
    starts = [0, 0, t0 if total.shape[2] > 1 else 0, s0 if total.shape[3] > 1 else 0]
    current = jax.lax.dynamic_slice(total, starts, list(block.shape))
    return jax.lax.dynamic_update_slice(total, current + block, starts)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _attend_fused(q, k, v, mask, bias, is_causal, implementation, zero_unseen_values=True):
    """``jax.nn.dot_product_attention`` on [B, T, N, H] after flattening leading axes."""
    lead, T, S = q.shape[:-3], q.shape[-3], k.shape[-3]

    def to_bnts(x):
        if x is None:
            return None
        n = x.shape[-3] if x.ndim >= 3 else 1
        return jnp.broadcast_to(x, (*lead, n, T, S)).reshape((-1, n, T, S))

    q3, k3, v3 = (x.reshape((-1,) + x.shape[-3:]) for x in (q, k, v))
    mask = to_bnts(mask)
    has_key = None
    if mask is not None:
        full = combine_masks(mask, causal_mask(T, S) if is_causal else None)  # [B', N|1, T, S]
        # jax.nn masks logits with `where` but gives an empty row uniform weights over every
        # key, and a zero weight times a NaN value is NaN: the reference's rules, applied here.
        if zero_unseen_values:
            v3 = jnp.where(full.any((-3, -2))[:, :, None, None], v3, jnp.zeros((), v3.dtype))
        has_key = jnp.moveaxis(full.any(-1), -2, -1)[..., None]  # [B', T, N|1, 1]
    out = jax.nn.dot_product_attention(q3, k3, v3, bias=to_bnts(bias), mask=mask,
                                       is_causal=is_causal, implementation=implementation)
    if has_key is not None:
        out = jnp.where(has_key, out, jnp.zeros((), out.dtype))
    return out.reshape(q.shape)


def multi_head_attention(
    params: dict,
    inputs_q: Array,
    inputs_kv: Array | tuple[Array, Array] | None = None,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
    rope_positions: Array | None = None,
    rope_base: float = 10000.0,
    dropout_rate: float = 0.0,
    key: Array | None = None,
    return_weights: bool = False,
    implementation: Implementation = None,
    cache: dict | None = None,
    cache_index: Array | int | None = None,
) -> Array | tuple:
    """Multi-head attention: ``Concat(head_1..head_N) W_O``, ``head_n = Attention(X W_Qn, Y W_Kn, Y W_Vn)``.

    Heads live in parallel sub-spaces of width H: Q/K/V are projected once into a
    head axis, ``scaled_dot_product_attention`` is vmapped over it (``attend``),
    and the heads are concatenated and projected by the ``out`` kernel.

    Args:
      params: from ``init_multi_head_attention`` (N, K, H are read off the kernels).
      inputs_q: [..., T, D].
      inputs_kv: [..., S, Dkv] for cross-attention, or a pair ``(k, v)``
        [..., S, K, H] already projected by ``project_kv``; ``None`` for self-attention.
      mask: boolean, broadcastable to [..., N, T, S]; True = may attend.
      bias: additive, broadcastable to [..., N, T, S] (e.g. ``positional.alibi_bias``).
      is_causal: apply a causal mask (decoder self-attention).
      rope_positions: positions [T] or [..., T]; if given, rotary embeddings rotate
        q and k (self-attention only).
      dropout_rate, key: attention-weight dropout; no key means deterministic.
      return_weights: also return the weights [..., N, T, S].
      implementation: ``None`` (vmapped reference), ``"xla"``, ``"cudnn"`` or ``"blockwise"``.
      cache: incremental self-attention (decoding): ``{"key", "value"}``
        [..., K, S_max, H] (``init_kv_cache``) holding the keys/values of positions
        < ``cache_index``.
        inputs_q are the T tokens at positions cache_index..cache_index+T-1 (pass
        these as ``rope_positions``); their keys/values are written into the cache
        and query t attends causally to cache positions <= cache_index + t, so S
        is S_max in ``mask``/``bias`` and ``is_causal`` is implied.
      cache_index: int32 scalar, the number of positions already in the cache.

    Returns:
      [..., T, Dout]; ``(out, weights [..., N, T, S])`` if ``return_weights``;
      with a ``cache``, the updated cache is appended: ``(out, cache)`` or
      ``(out, weights, cache)``.
    """
    if isinstance(inputs_kv, tuple):
        _check_float(inputs_q=inputs_q)
        q, (k, v) = dense(params["query"], inputs_q), inputs_kv
    else:
        q, k, v = project_qkv(params, inputs_q, inputs_kv)
    if rope_positions is not None:
        if inputs_kv is not None:
            raise ValueError("rope_positions applies to self-attention only (inputs_kv must be None)")
        q = positional.rotary(q, rope_positions, base=rope_base)
        k = positional.rotary(k, rope_positions, base=rope_base)
    if cache is not None:
        if inputs_kv is not None or cache_index is None:
            raise ValueError("a cache is for self-attention (inputs_kv=None) and needs cache_index")
        cache = update_kv_cache(cache, k, v, cache_index)
        # A view: the per-head products read the heads-first buffer as it is stored.
        k, v = heads_first(cache["key"]), heads_first(cache["value"])
        # Keys past cache_index + t are not written yet: causality also hides them.
        mask = combine_masks(mask, causal_mask(q.shape[-3], k.shape[-3], offset=cache_index))
        is_causal = False
    out, weights = attend(q, k, v, mask=mask, bias=bias, is_causal=is_causal,
                          dropout_rate=dropout_rate, key=key, return_weights=return_weights,
                          implementation=implementation, zero_unseen_values=cache is None)
    y = dense(params["out"], out, axes=2)
    outputs = (y, weights) if return_weights else (y,)
    if cache is not None:
        outputs += (cache,)
    return outputs if len(outputs) > 1 else y
