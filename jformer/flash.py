"""Blockwise (flash) attention: exact softmax attention in O(T) memory, with its own VJP.

The forward pass visits key blocks with an online softmax; the backward pass recomputes
each block's weights from the saved log-sum-exp. Block sizes of the backward pass are
chosen so that one float32 tile stays in cache (``_backward_blocks``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jformer.masks import MASKED, check_heads, combine_masks

Array = jax.Array


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
    lead, T, S, N, K = check_heads(q, k, v, mask, bias)
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
        # -inf, not MASKED: a masked logit's weight is then exactly 0 even in a row with no
        # allowed key (the running max stays at its MASKED start), so such a row sums to
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
        init = (jnp.full(shape, MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
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
