"""A plain (not equivariant) Transformer on a set of nodes: jformer's own encoder stack.

    t_i = [x_i, v_i, c_i, ...]  (raw coordinates and features, one token per node)
    y = Dense_out(Encoder(Dense_in(t)))     no positional encoding: the nodes are a set

The encoder is ``models.init_encoder`` / ``blocks.stack(blocks.encoder_layer, ...)``, i.e.
exactly the library's sequence encoder with a key mask for padding. Self-attention without
positions is permutation equivariant, but the raw coordinates make it neither translation
nor rotation equivariant: the negative control of the equivariance tests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jformer import blocks, layers, models
from jformer.blocks import Context
from jformer.config import ExecConfig, TransformerConfig

Array = jax.Array


@dataclass(frozen=True)
class SetTransformerConfig:
    """``d_in`` features per node token, ``d_out`` outputs per node, and the encoder's size
    (Pre-LN, ReLU, no dropout)."""

    d_in: int = 7
    d_out: int = 3
    d_model: int = 32
    num_heads: int = 4
    num_layers: int = 2
    d_ff: int = 64

    @property
    def encoder(self) -> TransformerConfig:
        """The stack's config; its ``positions`` is unused: positions are added by the models'
        token embedding, which this model does not run."""
        return TransformerConfig(d_model=self.d_model, num_heads=self.num_heads, num_layers=self.num_layers,
                                 d_ff=self.d_ff, dropout_rate=0.0, norm_position="pre")


def init_set_transformer(key: Array, cfg: SetTransformerConfig) -> dict:
    """``{"embed": dense [d_in, D], "encoder": models.init_encoder, "readout": dense [D, d_out]}``
    (one jitted program per config)."""
    return _init_jit(key, cfg)


@functools.partial(jax.jit, static_argnums=1)
def _init_jit(key: Array, cfg: SetTransformerConfig) -> dict:
    k1, k2, k3 = jax.random.split(key, 3)
    return {"embed": layers.init_dense(k1, cfg.d_in, cfg.d_model),
            "encoder": models.init_encoder(k2, cfg.encoder),
            "readout": layers.init_dense(k3, cfg.d_model, cfg.d_out)}


def set_transformer(params: dict, cfg: SetTransformerConfig, tokens: Array, mask: Array | None = None) -> Array:
    """The encoder on one set of node tokens: tokens [N, d_in], mask [N] bool -> [N, d_out].

    Pad nodes are masked as keys (they never contribute to a real node) and their outputs
    are zero.
    """
    if tokens.ndim != 2 or tokens.shape[-1] != cfg.d_in:
        raise ValueError(f"tokens must be [N, d_in] = [N, {cfg.d_in}], got shape {tuple(tokens.shape)}")
    n = tokens.shape[0]
    mask = jnp.ones((n,), bool) if mask is None else mask
    tokens = jnp.where(mask[:, None], tokens, 0)
    x = layers.dense(params["embed"], tokens)[None]  # [1, N, D]
    ctx = Context(cfg.encoder, ExecConfig(), mask=mask[None, None, None, :])
    x, _ = blocks.stack(blocks.encoder_layer, params["encoder"], x, ctx)
    return jnp.where(mask[:, None], layers.dense(params["readout"], x[0]), 0)
