"""E(n)-equivariant graph neural network (EGNN, Satorras, Hoogeboom & Welling 2021), one graph.

Layer t, over the pairs (i, j) of real nodes, i != j:

    m_ij = phi_e(h_i, h_j, |x_i - x_j|², a_ij)
    x_i  <- x_i + C sum_j (x_i - x_j) phi_x(m_ij)                       (no velocities)
    v_i  = phi_v(h_i) v_i^0 + C sum_j (x_i - x_j) phi_x(m_ij),  x_i <- x_i + v_i   (N-body variant)
    h_i  <- h_i + phi_h(h_i, sum_j m_ij)

with C = 1 / (number of real neighbours of i), so padding does not change the scale. As in
the paper's Eq. 7, every layer scales the *input* velocity v^0: feeding each layer's v to the
next would multiply the velocity by a product of L gains phi_v (at initialisation that blew
the predictions up to ~1e12). Only
invariants (h, distances, a_ij) enter the MLPs and x, v enter linearly through differences,
so rotations, reflections and translations (x only) commute with the layer. Layers have one
structure and run as a ``lax.scan`` over params stacked on [L].
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jformer import layers
from jformer.equivariant import features as F

Array = jax.Array


@dataclass(frozen=True)
class EGNNConfig:
    """What an EGNN is: ``node_in`` input scalars per node, ``hidden`` width, ``num_layers``,
    ``n_edge_feats`` scalar edge features a_ij, ``velocity`` (the N-body v update)."""

    node_in: int = 1
    hidden: int = 32
    num_layers: int = 4
    n_edge_feats: int = 0
    velocity: bool = True

    def __post_init__(self):
        for name in ("node_in", "hidden", "num_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EGNNConfig.{name} must be an int >= 1, got {v!r}")
        if isinstance(self.n_edge_feats, bool) or not isinstance(self.n_edge_feats, int) or self.n_edge_feats < 0:
            raise ValueError(f"EGNNConfig.n_edge_feats must be an int >= 0, got {self.n_edge_feats!r}")


def _mlp_specs(name: str, sizes: tuple[int, ...], last_std: float | None = None) -> dict:
    # kernels with std 1/sqrt(3 fan_in), torch.nn.Linear's default (the authors' init), the last
    # one ``last_std`` if given. He-normal's sqrt(2/fan_in), 2.4x larger per layer, let h grow
    # ~4x per layer through the summed messages and the predictions blow up at initialisation.
    last = len(sizes) - 2
    return {f"{name}/dense_{i}": ((a, b), last_std if i == last and last_std is not None else (3.0 * a) ** -0.5)
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}


def _mlp(params: dict, x: Array, final_act: bool = False) -> Array:
    n = len(params)
    for i in range(n):
        x = layers.dense(params[f"dense_{i}"], x)
        if i < n - 1 or final_act:
            x = jax.nn.silu(x)
    return x


def _init_layer(key: Array, cfg: EGNNConfig) -> dict:
    h = cfg.hidden
    specs = {**_mlp_specs("edge", (2 * h + 1 + cfg.n_edge_feats, h, h)),
             # small last layer, as the authors' code: coordinate updates start near zero
             **_mlp_specs("coord", (h, h, 1), last_std=1e-3),
             **_mlp_specs("vel", (h, h, 1)),
             **_mlp_specs("node", (2 * h, h, h))}
    params: dict = {}
    for name, p in F.init_normal_kernels(key, specs).items():  # one random draw for the layer
        mlp, dense = name.split("/")
        params.setdefault(mlp, {})[dense] = {**p, "bias": jnp.zeros(p["kernel"].shape[-1:], jnp.float32)}
    return params


def init_egnn(key: Array, cfg: EGNNConfig) -> dict:
    """Parameters ``{"embed": dense [node_in, hidden], "layers": per-layer MLPs stacked on [L]}``;
    each layer ``{"edge", "coord", "vel", "node"}`` is phi_e, phi_x, phi_v, phi_h (2-layer SiLU MLPs,
    kernels N(0, 1/(3 fan_in)) from one random draw per layer, phi_x's last layer N(0, 1e-6)).
    One jitted program per config (op by op, each small initialiser compiles on its own)."""
    return _init_jit(key, cfg)


@functools.partial(jax.jit, static_argnums=1)
def _init_jit(key: Array, cfg: EGNNConfig) -> dict:
    k1, k2 = jax.random.split(key)
    return {"embed": layers.init_dense(k1, cfg.node_in, cfg.hidden),
            "layers": jax.vmap(lambda k: _init_layer(k, cfg))(jax.random.split(k2, cfg.num_layers))}


def egnn_layer(params: dict, x: Array, v: Array | None, h: Array, pair_mask: Array,
               edge_feats: Array | None) -> tuple[Array, Array | None, Array]:
    """One EGNN layer (formulas in the module doc): x [N, 3], v [N, 3] | None (the input
    velocity v^0), h [N, H], pair_mask [N, N] bool, edge_feats [N, N, E] | None -> (x, v, h),
    v the layer's velocity estimate."""
    n = x.shape[0]
    diff = x[:, None, :] - x[None, :, :]  # [N, N, 3], x_i - x_j
    d2 = jnp.sum(jnp.square(diff), axis=-1, keepdims=True)
    parts = [jnp.broadcast_to(h[:, None, :], (n, n, h.shape[-1])), jnp.broadcast_to(h[None, :, :], (n, n, h.shape[-1])), d2]
    if edge_feats is not None:
        parts.append(edge_feats.astype(h.dtype))
    m = _mlp(params["edge"], jnp.concatenate(parts, axis=-1), final_act=True)  # [N, N, H]
    m = jnp.where(pair_mask[..., None], m, jnp.zeros((), m.dtype))
    count = jnp.maximum(pair_mask.sum(-1, keepdims=True), 1).astype(x.dtype)  # [N, 1]
    # where again: a masked m_ij is 0, but phi_x(0) need not be
    shift = jnp.where(pair_mask[..., None], diff * _mlp(params["coord"], m), 0.0).sum(1) / count
    if v is not None:
        v = _mlp(params["vel"], h) * v + shift
        x = x + v
    else:
        x = x + shift
    h = h + _mlp(params["node"], jnp.concatenate([h, m.sum(1)], axis=-1))
    return x, v, h


def egnn(params: dict, cfg: EGNNConfig, pos: Array, node_feats: Array, mask: Array | None = None,
         edge_feats: Array | None = None, vel: Array | None = None) -> tuple[Array, Array | None, Array]:
    """EGNN on one graph (fully connected over its real nodes).

    Args:
      pos: [N, 3] coordinates; node_feats: [N, node_in] invariant node inputs;
      mask: [N] bool (True = real; pad rows may hold anything, they are zeroed and ignored);
      edge_feats: [N, N, n_edge_feats] invariant a_ij, or None; vel: [N, 3], required iff
        ``cfg.velocity``.

    Returns:
      ``(pos, vel, h)``: [N, 3], [N, 3] or None, [N, hidden] after the last layer (pad rows
      zero for pos and vel).
    """
    F.check_positions("pos", pos)
    n = pos.shape[-2]
    if pos.ndim != 2:
        raise ValueError(f"pos must be one graph's coordinates [N, 3] (vmap for a batch), got shape {tuple(pos.shape)}")
    if tuple(node_feats.shape) != (n, cfg.node_in):
        raise ValueError(f"node_feats must be [N, node_in] = [{n}, {cfg.node_in}], got {tuple(node_feats.shape)}")
    if cfg.velocity != (vel is not None):
        raise ValueError(f"EGNNConfig.velocity={cfg.velocity} but vel is {'None' if vel is None else 'given'}")
    if vel is not None:
        F.check_positions("vel", vel)
        if vel.shape != pos.shape:
            raise ValueError(f"vel must have the shape of pos {tuple(pos.shape)}, got {tuple(vel.shape)}")
    if mask is not None:
        F.check_node_mask("mask", mask, n)
    if cfg.n_edge_feats and (edge_feats is None or tuple(edge_feats.shape) != (n, n, cfg.n_edge_feats)):
        raise ValueError(f"edge_feats must be [N, N, E] = [{n}, {n}, {cfg.n_edge_feats}], "
                         f"got {None if edge_feats is None else tuple(edge_feats.shape)}")
    mask = jnp.ones((n,), bool) if mask is None else mask
    # Zero pad rows first, so garbage there cannot reach a gradient through a masked branch.
    zero = lambda a: None if a is None else jnp.where(mask.reshape((n,) + (1,) * (a.ndim - 1)), a, 0)  # noqa: E731
    pos, vel, node_feats = zero(pos), zero(vel), zero(node_feats)
    pair_mask = mask[:, None] & mask[None, :] & ~jnp.eye(n, dtype=bool)
    if edge_feats is not None:
        edge_feats = jnp.where(pair_mask[..., None], edge_feats, 0)
    h = layers.dense(params["embed"], node_feats)

    def body(carry, p):
        x, _, h = carry
        x, v, h = egnn_layer(p, x, vel, h, pair_mask, edge_feats)
        return (zero(x), zero(v), zero(h)), None

    (pos, vel, h), _ = jax.lax.scan(body, (pos, vel, h), params["layers"])
    return pos, vel, h
