"""Tensor-field-network (TFN) kernels: the equivariant maps along an edge (Thomas et al. 2018).

For an edge with relative position r, the kernel taking a degree-k feature to degree l is

    W_lk(r) = sum_{J=|k-l|}^{k+l} phi_J^{lk}(|r|) · sum_{m_J} Y_{J m_J}(r / |r|) Q^{lk}_{J m_J}

with Y_J the real spherical harmonics and Q^{lk}_J = C(l, k, J) the Clebsch-Gordan coefficients,
both from e3nn-jax (so ``Y_J(R r) = D_J(R) Y_J(r)`` and ``W_lk(R r) = D_l(R) W_lk(r) D_k(R)ᵀ``).
The angular part, ``basis``, is fixed and computed once per graph; the radial part phi is a
small MLP of the distance (and of scalar edge features), one per (k, l) pair, giving a
[C_out, C_in] matrix per J.

Graph helpers live here too: an edge list is a static [N, K] index array ``idx`` (node i's
K neighbours) with a boolean [N, K] ``nbr_mask``; "full" connectivity is K = N with the
self-edge and pad nodes masked. Shapes stay static under ``jit``.
"""

from __future__ import annotations

import math

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp

from jformer import layers
from jformer.equivariant import features as F

Array = jax.Array


# ---------------------------------------------------------------- the graph


def full_neighbours(mask: Array) -> tuple[Array, Array]:
    """Every node is every other real node's neighbour.

    mask [N] bool -> ``idx`` [N, N] int32 (``idx[i, j] = j``) and ``nbr_mask`` [N, N] bool,
    ``nbr_mask[i, j] = mask_i & mask_j & (i != j)``.
    """
    n = mask.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (n, n))
    nbr = mask[:, None] & mask[None, :] & ~jnp.eye(n, dtype=bool)
    return idx, nbr


def knn_neighbours(pos: Array, mask: Array, k: int) -> tuple[Array, Array]:
    """The k nearest real nodes of each node (itself excluded), as a static [N, K] edge list.

    pos [N, 3], mask [N] bool -> ``idx`` [N, k] int32, ``nbr_mask`` [N, k] bool (False where a
    node has fewer than k real neighbours, and for every edge of a pad node). Distances
    are invariant, so the neighbour sets are too; the selection carries no gradient.
    """
    n = pos.shape[-2]
    if not 1 <= k <= n - 1:
        raise ValueError(f"neighbours={k} needs 1 <= k <= N - 1 = {n - 1}")
    pos = jax.lax.stop_gradient(pos)
    d2 = jnp.sum(jnp.square(pos[:, None, :] - pos[None, :, :]), axis=-1)
    allowed = mask[:, None] & mask[None, :] & ~jnp.eye(n, dtype=bool)
    _, idx = jax.lax.top_k(jnp.where(allowed, -d2, -jnp.inf), k)
    return idx.astype(jnp.int32), jnp.take_along_axis(allowed, idx, axis=-1)


def gather(feats: F.Features, idx: Array) -> F.Features:
    """Neighbour features: ``{l: [N, C, 2l+1]}`` -> ``{l: [N, K, C, 2l+1]}``, ``out[i, j] = f[idx[i, j]]``."""
    return {l: x[idx] for l, x in feats.items()}


def relative_positions(pos: Array, idx: Array) -> Array:
    """Edge vectors ``r_ij = x_{idx[i, j]} - x_i``: pos [N, 3], idx [N, K] -> [N, K, 3] (translation invariant)."""
    return pos[idx] - pos[:, None, :]


def safe_length(r: Array) -> tuple[Array, Array]:
    """``(|r|, r / |r|)`` for r [..., 3], both 0 where r = 0, with finite gradients there.

    The double ``where`` keeps the unselected branch finite too: the gradient of a ``where``
    is a product with both branches' derivatives, and 1/0 in either gives NaN.
    """
    n2 = jnp.sum(jnp.square(r), axis=-1)
    ok = n2 > 0
    root = jnp.sqrt(jnp.where(ok, n2, 1.0))
    length = jnp.where(ok, root, 0.0)
    unit = jnp.where(ok[..., None], r / root[..., None], 0.0)
    return length, unit


# ---------------------------------------------------------- the angular basis


def spherical_harmonics(r: Array, max_J: int) -> list[Array]:
    """Real spherical harmonics of the direction of r: ``[Y_0, ..., Y_maxJ]``, Y_J [..., 2J+1].

    e3nn-jax's 'component' normalisation (``|Y_J(u)|² = 2J+1`` on the unit sphere; Y_0 = 1,
    Y_1(u) = √3 u in Cartesian (x, y, z) order). At r = 0 the direction is undefined: there
    Y_0 = 1 and Y_J = 0 for J > 0 (the homogeneous polynomial of the zero vector), which is
    still equivariant.
    """
    _, unit = safe_length(r)
    sh = e3nn.spherical_harmonics(list(range(max_J + 1)), e3nn.IrrepsArray("1o", unit),
                                  normalize=False, normalization="component").array
    return [sh[..., J * J:(J + 1) * (J + 1)] for J in range(max_J + 1)]


def basis(r: Array, max_degree: int) -> dict:
    """The angular parts of every TFN kernel between degrees <= ``max_degree``, for edges r.

        B^{kl}[..., J, a, b] = sum_c Q^{lk}_J[a, b, c] Y_J(r / |r|)[c],   J = |k - l| .. k + l

    r [..., 3] -> ``{(k, l): [..., 2·min(k, l) + 1, 2l+1, 2k+1]}`` (J axis, output m, input m),
    Q^{lk}_J = ``e3nn.clebsch_gordan(l, k, J)`` [2l+1, 2k+1, 2J+1]. Computed once per graph and
    shared by every layer (the kernels differ only in their radial parts).
    """
    sh = spherical_harmonics(r, 2 * max_degree)
    out = {}
    for k in range(max_degree + 1):
        for l in range(max_degree + 1):
            per_J = [jnp.einsum("abc,...c->...ab", jnp.asarray(e3nn.clebsch_gordan(l, k, J), r.dtype), sh[J])
                     for J in range(abs(k - l), k + l + 1)]
            out[(k, l)] = jnp.stack(per_J, axis=-3)
    return out


# ------------------------------------------------------------- radial parts


def _radial_specs(n_in: int, hidden: int) -> dict:
    # He-normal kernels for the ReLUs
    return {"dense_0": ((n_in, hidden), math.sqrt(2.0 / n_in)), "dense_1": ((hidden, hidden), math.sqrt(2.0 / hidden))}


def _finish_radial(kernels: dict, hidden: int) -> dict:
    params = {}
    for i in range(2):
        params[f"dense_{i}"] = {**kernels[f"dense_{i}"], "bias": jnp.zeros((hidden,), jnp.float32)}
        params[f"norm_{i}"] = layers.init_layer_norm(hidden)
    return params


def init_radial(key: Array, n_in: int, hidden: int) -> dict:
    """The radial trunk: two (dense, LayerNorm, ReLU) layers of width ``hidden`` on [..., n_in],
    kernels N(0, 2 / fan_in) (He, for the ReLUs), biases zero."""
    return _finish_radial(F.init_normal_kernels(key, _radial_specs(n_in, hidden)), hidden)


def radial(params: dict, x: Array) -> Array:
    """The shared trunk ReLU(LN(Dense(ReLU(LN(Dense(x)))))): x [..., F] -> [..., hidden]."""
    for i in range(2):
        x = jax.nn.relu(F.layer_norm(params[f"norm_{i}"], layers.dense(params[f"dense_{i}"], x)))
    return x


def pair_name(k: int, l: int) -> str:
    """The params key of the (degree k in -> degree l out) kernel."""
    return f"k{k}_l{l}"


def _pairs(params: dict):
    for name, p in params.items():
        if name != "radial":
            k, l = name[1:].split("_l")
            yield int(k), int(l), p


def init_tfn(key: Array, fiber_in: F.Fiber, fiber_out: F.Fiber, n_dist_feats: int, hidden: int) -> dict:
    """TFN message parameters: ``{"radial": init_radial (the trunk shared by all pairs),
    "k{k}_l{l}": {"kernel": [hidden, n_J, C_out_l, C_in_k]}}`` for every k in ``fiber_in``, l in
    ``fiber_out`` (n_J = 2·min(k, l) + 1). ``n_dist_feats``: 1 (the distance) + scalar edge
    features. The paper has one MLP per pair; a shared trunk with a head per pair (as NequIP)
    computes the same kind of function with far fewer ops, which is most of the compile time.
    Heads are N(0, 1 / (hidden · n_J · C_in)) so a message starts near unit scale.
    """
    specs = {pair_name(k, l): ((hidden, 2 * min(k, l) + 1, fiber_out[l], fiber_in[k]),
                               1.0 / math.sqrt(hidden * (2 * min(k, l) + 1) * fiber_in[k]))
             for k in sorted(fiber_in) for l in sorted(fiber_out)}
    params = F.init_normal_kernels(key, {**specs, **_radial_specs(n_dist_feats, hidden)})  # one draw
    trunk = {name: params.pop(name) for name in ("dense_0", "dense_1")}
    return {"radial": _finish_radial(trunk, hidden), **params}


def tfn_messages(params: dict, basis: dict, dist_feats: Array, feats_src: F.Features) -> F.Features:
    """TFN messages along every edge: ``m_l = sum_k W_lk(r) f_k``, per edge, no aggregation.

        m_l[e, o, a] = sum_k sum_J sum_c phi_J^{lk}(d_e)[o, c] sum_b B^{kl}[e, J, a, b] f_k[e, c, b]

    with phi^{lk}(d) = Dense_lk(trunk(d)) [n_J, C_out, C_in].

    Args:
      params: from ``init_tfn``.
      basis: ``basis(r, max_degree)`` for the same edges, ``{(k, l): [..., n_J, 2l+1, 2k+1]}``.
      dist_feats: [..., F] rotation-invariant edge inputs of the radial MLPs (the distance
        and scalar edge features).
      feats_src: the source node's features on each edge, ``{k: [..., C_in_k, 2k+1]}``.
      ``...`` is the edge layout, e.g. [E] or [N, K].

    Returns:
      ``{l: [..., C_out_l, 2l+1]}``.
    """
    trunk = radial(params["radial"], dist_feats)
    out = {}
    for k, l, p in _pairs(params):
        phi = layers.dense(p, trunk)  # [..., J, o, c]
        g = jnp.einsum("...jab,...cb->...jca", basis[(k, l)], feats_src[k])
        m = jnp.einsum("...joc,...jca->...oa", phi, g)
        out[l] = m if l not in out else out[l] + m
    return out


def edge_inputs(r: Array, edge_feats: Array | None = None) -> Array:
    """The radial MLPs' input per edge: ``[|r|, edge_feats...]``, r [..., 3] -> [..., 1 + E]."""
    d = safe_length(r)[0][..., None]
    return d if edge_feats is None else jnp.concatenate([d, edge_feats.astype(d.dtype)], axis=-1)


# --------------------------------------------------------- a TFN convolution


def init_tfn_conv(key: Array, fiber_in: F.Fiber, fiber_out: F.Fiber, n_dist_feats: int, hidden: int) -> dict:
    """TFN convolution parameters: ``{"messages": init_tfn, "self": features.init_linear}``."""
    k1, k2 = jax.random.split(key)
    return {"messages": init_tfn(k1, fiber_in, fiber_out, n_dist_feats, hidden),
            "self": F.init_linear(k2, fiber_in, fiber_out)}


def tfn_conv(params: dict, basis: dict, dist_feats: Array, feats: F.Features, idx: Array,
             nbr_mask: Array) -> F.Features:
    """A TFN layer: mean of the messages from the real neighbours plus a self-interaction.

        y_l,i = W^self_l f_l,i + (1 / max(n_i, 1)) sum_{j: nbr_mask[i, j]} m_l(r_ij, f_idx[i, j])

    feats ``{k: [N, C_in_k, 2k+1]}``, idx / nbr_mask [N, K], basis and dist_feats for the [N, K]
    edges -> ``{l: [N, C_out_l, 2l+1]}``. A masked edge never contributes (``where``, so a
    non-finite message there cannot leak) and a node without neighbours gets only its
    self-interaction.
    """
    msgs = tfn_messages(params["messages"], basis, dist_feats, gather(feats, idx))
    count = jnp.maximum(nbr_mask.sum(-1), 1)[:, None, None]
    own = F.linear(params["self"], feats)
    out = {}
    for l, m in msgs.items():
        agg = jnp.where(nbr_mask[..., None, None], m, jnp.zeros((), m.dtype)).sum(-3) / count.astype(m.dtype)
        out[l] = agg + own[l] if l in own else agg
    return out
