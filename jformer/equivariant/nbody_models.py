"""Four N-body predictors on one signature, for the charged-particles experiment.

Every model is a pair

    init(key) -> params
    predict(params, pos [N, 3], vel [N, 3], charge [N], mask [N] bool | None) -> new positions [N, 3]

for ONE graph (``jax.vmap`` for a batch); pad rows (mask False) may hold anything and come
back as zeros. ``MODELS`` maps a name to the pair with the default config;
``nbody_model(name, **overrides)`` builds a pair with a changed config.

* ``"se3_transformer"``: type-0 inputs [charge, |v|], type-1 inputs [v, x - centroid], edge
  feature c_i c_j; the type-1 output is a displacement: x' = x + y_1. SE(3)-equivariant.
* ``"egnn"``: node inputs [|v|, charge], edge feature c_i c_j, the velocity variant; x' is the
  last layer's x. E(3)-equivariant.
* ``"transformer"``: jformer's encoder on tokens [x, v, c] (no positions), x' = x + y. Not
  equivariant (the control).
* ``"linear"``: x' = x + [x, v] W + b per node, W [6, 3] (zero at init: "nothing moves").
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jformer import layers
from jformer.equivariant import baseline, kernels
from jformer.equivariant.egnn import EGNNConfig, egnn, init_egnn
from jformer.equivariant import model as se3

Array = jax.Array

SE3_NBODY = se3.SE3TransformerConfig(degrees_in={0: 2, 1: 2}, degrees_hidden={0: 16, 1: 16}, degrees_out={1: 1},
                                     num_layers=2, n_heads=2, radial_hidden=32, n_edge_feats=1)
EGNN_NBODY = EGNNConfig(node_in=2, hidden=64, num_layers=4, n_edge_feats=1, velocity=True)
TRANSFORMER_NBODY = baseline.SetTransformerConfig(d_in=7, d_out=3, d_model=64, num_heads=4, num_layers=4, d_ff=128)


def _mask(mask: Array | None, n: int) -> Array:
    return jnp.ones((n,), bool) if mask is None else mask


def _charge_product(charge: Array) -> Array:
    return (charge[:, None] * charge[None, :])[..., None]  # [N, N, 1], invariant


# ----------------------------------------------------------------- SE(3)-T


def init_se3_nbody(key: Array, *, cfg: se3.SE3TransformerConfig = SE3_NBODY) -> dict:
    """``model.init_se3_transformer`` for the N-body fibers (in {0: 2, 1: 2}, out {1: 1})."""
    return se3.init_se3_transformer(key, cfg)


def predict_se3_nbody(params: dict, pos: Array, vel: Array, charge: Array, mask: Array | None = None, *,
                      cfg: se3.SE3TransformerConfig = SE3_NBODY) -> Array:
    """x' = x + y_1[:, 0], y = SE3Transformer(x, {0: [c, |v|], 1: [v, x - centroid]}, a_ij = c_i c_j).

    pos, vel [N, 3], charge [N], mask [N] -> [N, 3]. The centroid is the mean over real nodes
    (translation invariant input); |v| is 0-safe.
    """
    m = _mask(mask, pos.shape[0])
    pos = jnp.where(m[:, None], pos, 0)
    vel = jnp.where(m[:, None], vel, 0)
    charge = jnp.where(m, charge, 0).astype(pos.dtype)
    w = m.astype(pos.dtype)[:, None]
    centroid = (w * pos).sum(0) / jnp.maximum(w.sum(), 1)
    speed = kernels.safe_length(vel)[0]
    feats = {0: jnp.stack([charge, speed], axis=-1)[..., None], 1: jnp.stack([vel, pos - centroid], axis=1)}
    out = se3.se3_transformer(params, cfg, pos, feats, m, _charge_product(charge))
    return jnp.where(m[:, None], pos + out[1][:, 0], 0)


# --------------------------------------------------------------------- EGNN


def init_egnn_nbody(key: Array, *, cfg: EGNNConfig = EGNN_NBODY) -> dict:
    """``egnn.init_egnn`` with node inputs [|v|, charge] and one edge feature."""
    return init_egnn(key, cfg)


def predict_egnn_nbody(params: dict, pos: Array, vel: Array, charge: Array, mask: Array | None = None, *,
                       cfg: EGNNConfig = EGNN_NBODY) -> Array:
    """x' = the last EGNN layer's x, with h_0 = [|v|, c], a_ij = c_i c_j, v the velocities."""
    m = _mask(mask, pos.shape[0])
    vel = jnp.where(m[:, None], vel, 0)
    charge = jnp.where(m, charge, 0).astype(pos.dtype)
    h0 = jnp.stack([kernels.safe_length(vel)[0], charge], axis=-1)
    x, _, _ = egnn(params, cfg, pos, h0, m, _charge_product(charge), vel)
    return x


# -------------------------------------------------------------- baselines


def init_transformer_nbody(key: Array, *, cfg: baseline.SetTransformerConfig = TRANSFORMER_NBODY) -> dict:
    """``baseline.init_set_transformer`` on 7 inputs [x, v, c], 3 outputs."""
    return baseline.init_set_transformer(key, cfg)


def predict_transformer_nbody(params: dict, pos: Array, vel: Array, charge: Array, mask: Array | None = None, *,
                              cfg: baseline.SetTransformerConfig = TRANSFORMER_NBODY) -> Array:
    """x' = x + Encoder([x, v, c]) per node (not equivariant)."""
    m = _mask(mask, pos.shape[0])
    tokens = jnp.concatenate([pos, vel, charge[:, None].astype(pos.dtype)], axis=-1)
    out = baseline.set_transformer(params, cfg, tokens, m)
    return jnp.where(m[:, None], pos + out, 0)


def init_linear_nbody(key: Array) -> dict:
    """``{"kernel": zeros [6, 3], "bias": zeros [3]}`` (key unused: the zero map is the start)."""
    del key
    return {"kernel": jnp.zeros((6, 3), jnp.float32), "bias": jnp.zeros((3,), jnp.float32)}


def predict_linear_nbody(params: dict, pos: Array, vel: Array, charge: Array, mask: Array | None = None) -> Array:
    """x' = x + [x, v] W + b per node: [N, 3] -> [N, 3]."""
    del charge
    m = _mask(mask, pos.shape[0])
    out = pos + layers.dense(params, jnp.concatenate([pos, vel], axis=-1))
    return jnp.where(m[:, None], out, 0)


_PAIRS = {
    "se3_transformer": (init_se3_nbody, predict_se3_nbody, SE3_NBODY),
    "egnn": (init_egnn_nbody, predict_egnn_nbody, EGNN_NBODY),
    "transformer": (init_transformer_nbody, predict_transformer_nbody, TRANSFORMER_NBODY),
    "linear": (init_linear_nbody, predict_linear_nbody, None),
}


def nbody_model(name: str, **overrides):
    """``(init(key), predict(params, pos, vel, charge, mask))`` of model ``name`` with its default
    config changed by ``overrides`` (``dataclasses.replace``; the linear model has none)."""
    if name not in _PAIRS:
        raise ValueError(f"unknown N-body model {name!r}; valid: {sorted(_PAIRS)}")
    init, predict, cfg = _PAIRS[name]
    if cfg is None:
        if overrides:
            raise ValueError(f"the {name!r} model has no config to override, got {sorted(overrides)}")
        return init, predict
    cfg = dataclasses.replace(cfg, **overrides)
    return functools.partial(init, cfg=cfg), functools.partial(predict, cfg=cfg)


MODELS = {name: nbody_model(name) for name in _PAIRS}
