"""Attention: softmax(Q Kᵀ / √H) V, and its multi-head form as ``vmap`` over heads.

Shape legend (used in every docstring of jformer): B batch, T query length,
S key/value length, D model width, N query heads, K key/value heads,
G = N / K query heads per key/value head, H head width, F feed-forward width,
V vocabulary, L layers. ``...`` is any number of leading batch axes.

Masks are boolean, ``True`` means "may attend" (``jformer.masks``). Two multi-head
paths compute the same function:

* ``reference_multi_head_attention``: the textbook form, literally
  ``jax.vmap(scaled_dot_product_attention)`` over the head axis between the input
  projections and the output projection;
* ``multi_head_attention``: the fast path every model runs, with grouped key/value
  heads, the KV cache, rotary positions and a kernel switch (reference vmap,
  ``jax.nn.dot_product_attention``, or blockwise ``jformer.flash``).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from jformer import positional
from jformer.cache import read_kv_cache, update_kv_cache
from jformer.config import check_size
from jformer.flash import blockwise_attention
from jformer.layers import dense, dropout, init_dense
from jformer.masks import apply_mask, causal_mask, check_broadcast, check_float, check_heads, check_mask, combine_masks

Array = jax.Array
Implementation = Literal["xla", "cudnn", "blockwise"] | None


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
    check_float(q=q, k=k, v=v)
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
    check_mask(mask, logits_shape, "[..., T, S]")
    check_broadcast("bias", bias, logits_shape, "[..., T, S]")

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = jnp.einsum("...th,...sh->...ts", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    mask = combine_masks(mask, causal_mask(T, S) if is_causal else None)
    logits, v = apply_mask(logits, v, mask, zero_unseen_values)
    weights = jax.nn.softmax(logits, axis=-1)
    if mask is not None:  # an empty row is zeros, not uniform over keys it may not see
        weights = jnp.where(mask.any(-1, keepdims=True), weights, 0.0)
    probs = dropout(weights, dropout_rate, key)
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
    params: dict, inputs_q: Array, inputs_kv: Array | None = None, *, fast_dense: bool = False
) -> tuple[Array, Array, Array]:
    """Project inputs into heads: q [..., T, N, H], k and v [..., S, K, H].

    ``inputs_q`` [..., T, D]; ``inputs_kv`` [..., S, Dkv] (cross-attention) or
    ``None`` (self-attention: K and V come from ``inputs_q``). ``fast_dense``: see
    ``layers.dense``.
    """
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    check_float(inputs_q=inputs_q)
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
        qkv = dense(fused, inputs_q, fast=fast_dense)  # [..., T, N + 2K, H]
        N, K = params["query"]["kernel"].shape[-2], params["key"]["kernel"].shape[-2]
        return qkv[..., :N, :], qkv[..., N:N + K, :], qkv[..., N + K:, :]
    return (dense(params["query"], inputs_q, fast=fast_dense),
            *project_kv(params, inputs_kv, fast_dense=fast_dense))


_QKV = ("query", "key", "value")


def _fusable_qkv(params: dict) -> bool:
    """Whether the query, key and value kernels [D, ·, H] and biases concatenate along the head axis."""
    return (len({(params[n]["kernel"].shape[0], params[n]["kernel"].shape[-1]) for n in _QKV}) == 1
            and len({frozenset(params[n]) for n in _QKV}) == 1)


def project_kv(params: dict, inputs_kv: Array, *, fast_dense: bool = False) -> tuple[Array, Array]:
    """Project keys and values only: inputs_kv [..., S, Dkv] -> k, v [..., S, K, H].

    For attending many times to one fixed memory (cross-attention while decoding):
    project once, then pass ``(k, v)`` as ``inputs_kv`` of ``multi_head_attention``.
    """
    check_float(inputs_kv=inputs_kv)
    d_kv = params["key"]["kernel"].shape[0]
    if inputs_kv.shape[-1] != d_kv:
        raise ValueError(f"inputs_kv width {inputs_kv.shape[-1]} (shape {tuple(inputs_kv.shape)}) "
                         f"does not match the key/value kernel input width {d_kv}")
    return dense(params["key"], inputs_kv, fast=fast_dense), dense(params["value"], inputs_kv, fast=fast_dense)


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
    lead, T, S, N, K = check_heads(q, k, v, mask, bias)

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
    fast_dense: bool = False,
    cache: dict | None = None,
    cache_index: Array | int | None = None,
) -> tuple[Array, dict]:
    """Multi-head attention: ``Concat(head_1..head_N) W_O``, ``head_n = Attention(X W_Qn, Y W_Kn, Y W_Vn)``.

    The same function as ``reference_multi_head_attention``, on the fast path: Q/K/V
    are projected once into a head axis (one fused matmul for self-attention),
    ``attend`` runs the heads (grouped key/value heads read without copies, a KV
    cache read as stored), and the heads are concatenated and projected by ``out``.

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
      return_weights: also return the weights [..., N, T, S] in ``aux["attention"]``.
      implementation: ``None`` (vmapped reference), ``"xla"``, ``"cudnn"`` or ``"blockwise"``.
      fast_dense: the projections use ``layers.dense``'s CPU fast path.
      cache: incremental self-attention (decoding): ``{"key", "value"}``
        [..., K, S_max, H] (``cache.init_kv_cache``) holding the keys/values of
        positions < ``cache_index``. inputs_q are the T tokens at positions
        cache_index..cache_index+T-1 (pass these as ``rope_positions``); their
        keys/values are written into the cache and query t attends causally to
        cache positions <= cache_index + t, so S is S_max in ``mask``/``bias`` and
        ``is_causal`` is implied.
      cache_index: int32 scalar, the number of positions already in the cache.

    Returns:
      ``(y [..., T, Dout], aux)``, ``aux = {"attention": weights [..., N, T, S] or None,
      "cache": the updated cache or None}``.
    """
    if isinstance(inputs_kv, tuple):
        check_float(inputs_q=inputs_q)
        q, (k, v) = dense(params["query"], inputs_q, fast=fast_dense), inputs_kv
    else:
        q, k, v = project_qkv(params, inputs_q, inputs_kv, fast_dense=fast_dense)
    if rope_positions is not None:
        if inputs_kv is not None:
            raise ValueError("rope_positions applies to self-attention only (inputs_kv must be None)")
        q = positional.rotary(q, rope_positions, base=rope_base)
        k = positional.rotary(k, rope_positions, base=rope_base)
    if cache is not None:
        if inputs_kv is not None or cache_index is None:
            raise ValueError("a cache is for self-attention (inputs_kv=None) and needs cache_index")
        cache = update_kv_cache(cache, k, v, cache_index)
        k, v = read_kv_cache(cache)
        # Keys past cache_index + t are not written yet: causality also hides them.
        mask = combine_masks(mask, causal_mask(q.shape[-3], k.shape[-3], offset=cache_index))
        is_causal = False
    out, weights = attend(q, k, v, mask=mask, bias=bias, is_causal=is_causal,
                          dropout_rate=dropout_rate, key=key, return_weights=return_weights,
                          implementation=implementation, zero_unseen_values=cache is None)
    y = dense(params["out"], out, axes=2, fast=fast_dense)
    return y, {"attention": weights, "cache": cache}


def reference_multi_head_attention(params: dict, inputs_q: Array, inputs_kv: Array | None = None, *,
                                   mask: Array | None = None) -> Array:
    """The textbook multi-head attention: N single-head attentions in parallel sub-spaces.

        head_n = softmax(X W_Qn (Y W_Kn)ᵀ / √H) Y W_Vn,    y = Concat(head_1..head_N) W_O

    written as it reads: project into a head axis, ``jax.vmap`` the single-head
    ``scaled_dot_product_attention`` over it, concatenate and project. The same
    function as ``multi_head_attention`` (tested equal), without its fast-path
    concerns (grouped heads, caches, kernels).

    Args:
      params: from ``init_multi_head_attention`` with K = N.
      inputs_q: [..., T, D]; inputs_kv: [..., S, Dkv] or ``None`` (self-attention).
      mask: boolean [..., N|1, T, S] (True = may attend) or ``None``.

    Returns:
      [..., T, Dout].
    """
    q, k, v = project_qkv(params, inputs_q, inputs_kv)  # [..., T|S, N, H]
    if k.shape[-2] != q.shape[-2]:
        raise ValueError(f"the reference has one key/value head per query head: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}; use multi_head_attention for grouped heads")
    mask_axis = None if mask is None or mask.ndim < 3 or mask.shape[-3] == 1 else -3
    if mask is not None and mask_axis is None and mask.ndim >= 3:
        mask = jnp.squeeze(mask, -3)

    def head(q1, k1, v1, m):  # one head: q1 [..., T, H], k1, v1 [..., S, H]
        return scaled_dot_product_attention(q1, k1, v1, mask=m)

    out = jax.vmap(head, in_axes=(-2, -2, -2, mask_axis), out_axes=-2)(q, k, v, mask)  # [..., T, N, H]
    return dense(params["out"], out, axes=2)
