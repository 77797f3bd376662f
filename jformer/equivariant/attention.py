"""SE(3)-equivariant multi-head self-attention (Fuchs et al. 2020, the SE(3)-Transformer layer).

For node i and each neighbour j (edge vector r_ij = x_j - x_i):

    q_l,i  = W^Q_l f_l,i                                  (per-degree linear map, features.linear)
    k_l,ij = sum_k W^K_lk(r_ij) f_k,j                     (TFN messages, kernels.tfn_messages)
    v_l,ij = sum_k W^V_lk(r_ij) f_k,j
    a_ij   = softmax_j( sum_l <q_l,i, k_l,ij> / sqrt(d) )   over the j with nbr_mask[i, j]
    y_l,i  = W^S_l [ sum_j a_ij v_l,ij ; f_l,i ]            (concatenated with the skip, then
                                                            a per-degree self-interaction)

<q, k> = sum over channels and m of the product: invariant, since both rotate by the same
orthogonal D_l. Heads split the channels of every degree into H groups and ``jax.vmap`` one
single-head attention over them, as ``jformer.attention.reference_multi_head_attention``
does over its head axis; d is the width of one head, sum_l (C_l / H)(2l+1).

Masking follows jformer's rule: boolean, True = may attend; logits are masked with
``where``, values of masked edges are zeroed, and a node with no valid neighbour gets zero
weights and a zero attention output (its skip still passes).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jformer.equivariant import features as F
from jformer.equivariant import kernels

Array = jax.Array


def single_head_attention(q: F.Features, k: F.Features, v: F.Features, nbr_mask: Array) -> F.Features:
    """One head of equivariant attention over each node's own edge list.

        a_ij = softmax_j(sum_l sum_{c,m} q_l[i, c, m] k_l[i, j, c, m] / sqrt(d)),  y_l,i = sum_j a_ij v_l[i, j]

    Args:
      q: ``{l: [N, c_l, 2l+1]}`` queries.
      k: ``{l: [N, K, c_l, 2l+1]}`` keys on the edges (same degrees and channels as q).
      v: ``{l: [N, K, cv_l, 2l+1]}`` values on the edges.
      nbr_mask: [N, K] bool, True = node i may attend edge j.

    Returns:
      ``{l: [N, cv_l, 2l+1]}``; zero for a node whose mask row is all False.

    Logits and softmax run in float32 at least (float64 stays float64).
    """
    first = next(iter(q.values()))
    dt = jnp.promote_types(first.dtype, jnp.float32)
    d = sum(x.shape[-2] * x.shape[-1] for x in q.values())
    logits = sum(jnp.einsum("ncm,nkcm->nk", q[l].astype(dt), k[l].astype(dt)) for l in q) / math.sqrt(d)
    # where, not an additive bias: a NaN logit on a masked edge would survive a bias.
    logits = jnp.where(nbr_mask, logits, jnp.finfo(dt).min)
    weights = jax.nn.softmax(logits, axis=-1)
    weights = jnp.where(nbr_mask, weights, 0.0)  # an empty row is zeros, not uniform
    out = {}
    for l, x in v.items():
        x = jnp.where(nbr_mask[..., None, None], x, jnp.zeros((), x.dtype))  # 0 · NaN would be NaN
        out[l] = jnp.einsum("nk,nkcm->ncm", weights.astype(x.dtype), x)
    return out


def _split_heads(feats: F.Features, n_heads: int, axis: int) -> F.Features:
    # channels of each degree -> [H, C/H] at ``axis`` (the channel axis, counted from the end)
    return {l: x.reshape(x.shape[:x.ndim + axis] + (n_heads, x.shape[axis] // n_heads) + x.shape[x.ndim + axis + 1:])
            for l, x in feats.items()}


def _merge_heads(feats: F.Features) -> F.Features:
    return {l: x.reshape(x.shape[:-3] + (x.shape[-3] * x.shape[-2], x.shape[-1])) for l, x in feats.items()}


def key_fiber(fiber_in: F.Fiber, fiber_out: F.Fiber) -> F.Fiber:
    """The degrees that get queries and keys: those of ``fiber_out`` that ``fiber_in`` also has
    (a query is a linear map of the node's own features), with ``fiber_out``'s channels."""
    return {l: c for l, c in fiber_out.items() if l in fiber_in}


def init_se3_attention(key: Array, fiber_in: F.Fiber, fiber_out: F.Fiber, n_heads: int, n_dist_feats: int,
                       radial_hidden: int) -> dict:
    """Parameters of one SE(3)-attention layer ``fiber_in -> fiber_out``:

    ``{"query": linear (in -> key fiber), "key": TFN (in -> key fiber), "value": TFN (in -> out),
    "self": linear ([out ; in] -> out)}``. The key fiber (``key_fiber``) must be non-empty, and
    ``n_heads`` must divide the channels of every degree of the key fiber and of ``fiber_out``.
    """
    fk = key_fiber(fiber_in, fiber_out)
    if not fk:
        raise ValueError(f"attention {fiber_in} -> {fiber_out}: no degree in both, so no query; "
                         f"use kernels.tfn_conv for this layer")
    for name, fib in (("key", fk), ("output", fiber_out)):
        for l, c in fib.items():
            if c % n_heads:
                raise ValueError(f"n_heads={n_heads} does not divide the {c} {name} channels of degree {l}")
    kq, kk, kv, ks = jax.random.split(key, 4)
    cat = {l: c + fiber_in.get(l, 0) for l, c in fiber_out.items()}
    return {"query": F.init_linear(kq, fiber_in, fk),
            "key": kernels.init_tfn(kk, fiber_in, fk, n_dist_feats, radial_hidden),
            "value": kernels.init_tfn(kv, fiber_in, fiber_out, n_dist_feats, radial_hidden),
            "self": F.init_linear(ks, cat, fiber_out)}


def se3_attention(params: dict, feats: F.Features, basis: dict, dist_feats: Array, idx: Array, nbr_mask: Array,
                  *, n_heads: int) -> F.Features:
    """One SE(3)-equivariant multi-head self-attention layer with skip and self-interaction.

    Args:
      params: from ``init_se3_attention``.
      feats: ``{l: [N, C_in_l, 2l+1]}`` node features (pad rows zero).
      basis: ``kernels.basis(r, max_degree)`` for the [N, K] edges r_ij = x_idx[i,j] - x_i.
      dist_feats: [N, K, F] radial inputs (``kernels.edge_inputs``).
      idx: [N, K] int neighbour indices; nbr_mask: [N, K] bool.
      n_heads: H, static.

    Returns:
      ``{l: [N, C_out_l, 2l+1]}``: ``W^S_l [attention_l ; f_l]`` (formula in the module doc).
    """
    src = kernels.gather(feats, idx)  # {l: [N, K, C, 2l+1]}
    q = F.linear(params["query"], feats)
    k = kernels.tfn_messages(params["key"], basis, dist_feats, src)
    v = kernels.tfn_messages(params["value"], basis, dist_feats, src)
    heads = jax.vmap(single_head_attention, in_axes=(-3, -3, -3, None), out_axes=-3)(
        _split_heads(q, n_heads, -2), _split_heads(k, n_heads, -2), _split_heads(v, n_heads, -2), nbr_mask)
    return F.linear(params["self"], F.concat(_merge_heads(heads), feats))


def resolve_neighbours(neighbours, pos: Array, mask: Array) -> tuple[Array, Array]:
    """``(idx [N, K], nbr_mask [N, K])`` for ``neighbours="full"`` (K = N) or an int k (k nearest)."""
    if neighbours == "full":
        return kernels.full_neighbours(mask)
    return kernels.knn_neighbours(pos, mask, neighbours)
