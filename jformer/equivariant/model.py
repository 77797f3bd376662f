"""The SE(3)-Transformer (Fuchs et al. 2020) for one graph: attention layers, norm nonlinearities,
a TFN output layer.

    h^1 = NormNL(Attention_in->hid(f))                     (its own params: other input degrees)
    h^{t+1} = NormNL(Attention_hid->hid(h^t))  t = 1..L-1  (params stacked on [L-1], lax.scan)
    y = TFNConv_hid->out(h^L)

Every step is equivariant, so the whole map is: for a rotation R and translation t,
``y(R x + t, f D(R)ᵀ) = y(x, f) D(R)ᵀ`` degree by degree (type-0 outputs invariant, type-1
outputs rotate as vectors). One graph per call; a batch of graphs is ``jax.vmap`` over
``pos``, ``feats``, ``mask`` and ``edge_feats``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jformer.equivariant import attention as A
from jformer.equivariant import features as F
from jformer.equivariant import kernels

Array = jax.Array


def _frozen_fiber(name: str, fiber) -> tuple:
    return tuple(F.check_fiber(name, fiber).items())


@dataclass(frozen=True)
class SE3TransformerConfig:
    """What an SE(3)-Transformer is (hashable: a static argument of ``jit``).

    Fibers are given as ``{l: channels}`` dicts (stored as sorted ``((l, C), ...)`` tuples so the
    config hashes; read them back with ``.fiber_in`` etc. as dicts).

    Attributes:
      degrees_in / degrees_hidden / degrees_out: the input, hidden and output fibers.
      num_layers: attention layers (>= 1): the first maps the input fiber to the hidden one,
        the other ``num_layers - 1`` are hidden -> hidden and scanned.
      n_heads: attention heads; divides every hidden channel count.
      max_degree: the highest degree of the kernel basis; default (None) the highest degree
        of the three fibers.
      radial_hidden: width of the radial MLPs.
      neighbours: ``"full"`` (every other real node) or an int k (the k nearest).
      n_edge_feats: scalar edge features per edge (``edge_feats`` [N, N, E]), 0 for none.
    """

    degrees_in: tuple | dict = ((0, 1),)
    degrees_hidden: tuple | dict = ((0, 8), (1, 8))
    degrees_out: tuple | dict = ((1, 1),)
    num_layers: int = 2
    n_heads: int = 1
    max_degree: int | None = None
    radial_hidden: int = 32
    neighbours: str | int = "full"
    n_edge_feats: int = 0

    def __post_init__(self):
        for name in ("degrees_in", "degrees_hidden", "degrees_out"):
            object.__setattr__(self, name, _frozen_fiber(f"SE3TransformerConfig.{name}", getattr(self, name)))
        for name in ("num_layers", "n_heads", "radial_hidden"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SE3TransformerConfig.{name} must be an int >= 1, got {v!r}")
        if isinstance(self.n_edge_feats, bool) or not isinstance(self.n_edge_feats, int) or self.n_edge_feats < 0:
            raise ValueError(f"SE3TransformerConfig.n_edge_feats must be an int >= 0, got {self.n_edge_feats!r}")
        nb = self.neighbours
        if nb != "full" and (isinstance(nb, bool) or not isinstance(nb, int) or nb < 1):
            raise ValueError(f"SE3TransformerConfig.neighbours must be 'full' or an int k >= 1, got {nb!r}")
        top = max(l for fib in (self.fiber_in, self.fiber_hidden, self.fiber_out) for l in fib)
        if self.max_degree is not None and self.max_degree < top:
            raise ValueError(f"SE3TransformerConfig.max_degree={self.max_degree} is below the highest "
                             f"degree of the fibers, {top}")
        if not A.key_fiber(self.fiber_in, self.fiber_hidden):
            raise ValueError(f"the first attention layer needs a degree in both degrees_in {self.fiber_in} "
                             f"and degrees_hidden {self.fiber_hidden} (its queries)")
        for l, c in self.fiber_hidden.items():
            if c % self.n_heads:
                raise ValueError(f"SE3TransformerConfig.n_heads={self.n_heads} does not divide the "
                                 f"{c} hidden channels of degree {l}")

    @property
    def fiber_in(self) -> dict:
        return dict(self.degrees_in)

    @property
    def fiber_hidden(self) -> dict:
        return dict(self.degrees_hidden)

    @property
    def fiber_out(self) -> dict:
        return dict(self.degrees_out)

    @property
    def basis_degree(self) -> int:
        """The highest degree of the kernel basis: ``max_degree``, or the fibers' highest."""
        top = max(l for fib in (self.fiber_in, self.fiber_hidden, self.fiber_out) for l in fib)
        return top if self.max_degree is None else self.max_degree

    @property
    def n_dist_feats(self) -> int:
        return 1 + self.n_edge_feats


def _init_block(key: Array, cfg: SE3TransformerConfig, fiber_in: dict) -> dict:
    return {"attention": A.init_se3_attention(key, fiber_in, cfg.fiber_hidden, cfg.n_heads, cfg.n_dist_feats,
                                              cfg.radial_hidden),
            "norm": F.init_norm_nonlinearity(cfg.fiber_hidden)}


def init_se3_transformer(key: Array, cfg: SE3TransformerConfig) -> dict:
    """Parameters: ``{"first": block, "hidden": blocks stacked on [num_layers - 1] (absent if 0),
    "out": TFN conv}``, a block being ``{"attention": init_se3_attention, "norm": norm NL}``.

    Runs as one jitted program per config: op by op, the hundreds of small initialisers
    each compiled on their own (seconds for a degree-3 model).
    """
    return _init_jit(key, cfg)


@functools.partial(jax.jit, static_argnums=1)
def _init_jit(key: Array, cfg: SE3TransformerConfig) -> dict:
    k_first, k_hidden, k_out = jax.random.split(key, 3)
    params = {"first": _init_block(k_first, cfg, cfg.fiber_in)}
    if cfg.num_layers > 1:
        params["hidden"] = jax.vmap(lambda k: _init_block(k, cfg, cfg.fiber_hidden))(
            jax.random.split(k_hidden, cfg.num_layers - 1))
    params["out"] = kernels.init_tfn_conv(k_out, cfg.fiber_hidden, cfg.fiber_out, cfg.n_dist_feats,
                                          cfg.radial_hidden)
    return params


def check_inputs(cfg: SE3TransformerConfig, pos, feats, mask, edge_feats) -> int:
    """Validate one graph's inputs (shapes are static, so this also runs under ``jit``); returns N."""
    F.check_positions("pos", pos)
    if pos.ndim != 2:
        raise ValueError(f"pos must be one graph's coordinates [N, 3] (vmap for a batch), got shape {tuple(pos.shape)}")
    n = pos.shape[0]
    F.check_features("feats", feats, n_nodes=n, fiber=cfg.fiber_in)
    for l, x in feats.items():
        if x.ndim != 3:
            raise ValueError(f"feats[{l}] must be one graph's [N, C, 2l+1], got shape {tuple(x.shape)}")
    if mask is not None:
        F.check_node_mask("mask", mask, n)
        if mask.ndim != 1:
            raise ValueError(f"mask must be [N] = [{n}] for one graph, got shape {tuple(mask.shape)}")
    if cfg.n_edge_feats and (edge_feats is None or tuple(edge_feats.shape) != (n, n, cfg.n_edge_feats)):
        got = None if edge_feats is None else tuple(edge_feats.shape)
        raise ValueError(f"edge_feats must be [N, N, E] = [{n}, {n}, {cfg.n_edge_feats}], got {got}")
    if not cfg.n_edge_feats and edge_feats is not None:
        raise ValueError(f"edge_feats given (shape {tuple(edge_feats.shape)}) but the config has n_edge_feats=0")
    return n


def se3_transformer(params: dict, cfg: SE3TransformerConfig, pos: Array, feats: F.Features,
                    mask: Array | None = None, edge_feats: Array | None = None, *,
                    return_hidden: bool = False):
    """The SE(3)-Transformer on one graph.

    Args:
      params: from ``init_se3_transformer(key, cfg)``.
      cfg: the config (static).
      pos: [N, 3] coordinates.
      feats: ``{l: [N, C_l, 2l+1]}`` with the fiber ``cfg.degrees_in``.
      mask: [N] bool, True = real node; pad nodes may hold anything (they are zeroed first
        and never attended to). None: every node is real.
      edge_feats: [N, N, E] scalar (invariant) edge features, E = ``cfg.n_edge_feats``.
      return_hidden: also return the hidden features after every attention layer.

    Returns:
      ``{l: [N, C_out_l, 2l+1]}`` (pad rows zero), and with ``return_hidden`` also
      ``{l: [num_layers, N, C_hid_l, 2l+1]}``.
    """
    n = check_inputs(cfg, pos, feats, mask, edge_feats)
    mask = jnp.ones((n,), bool) if mask is None else mask
    # Zero pad rows first: garbage (inf, NaN) there would otherwise reach gradients through
    # the masked branches of ``where``.
    pos = jnp.where(mask[:, None], pos, jnp.zeros((), pos.dtype))
    feats = F.mask_features(feats, mask)
    idx, nbr_mask = A.resolve_neighbours(cfg.neighbours, pos, mask)
    r = kernels.relative_positions(pos, idx)  # [N, K, 3]
    basis = kernels.basis(r, cfg.basis_degree)
    if edge_feats is not None:
        edge_feats = jnp.where(nbr_mask[..., None], jnp.take_along_axis(edge_feats, idx[..., None], axis=1), 0)
    dist_feats = kernels.edge_inputs(r, edge_feats)

    def block(p, h):
        h = A.se3_attention(p["attention"], h, basis, dist_feats, idx, nbr_mask, n_heads=cfg.n_heads)
        return F.mask_features(F.norm_nonlinearity(p["norm"], h), mask)

    h = block(params["first"], feats)
    hidden = [{l: x[None] for l, x in h.items()}]
    if "hidden" in params:
        h, ys = jax.lax.scan(lambda c, p: _scan_step(block, c, p, return_hidden), h, params["hidden"])
        if return_hidden:
            hidden.append(ys)
    out = kernels.tfn_conv(params["out"], basis, dist_feats, h, idx, nbr_mask)
    out = F.mask_features(out, mask)
    if return_hidden:
        return out, {l: jnp.concatenate([x[l] for x in hidden], axis=0) for l in h}
    return out


def _scan_step(block, h, p, keep: bool):
    h = block(p, h)
    return h, (h if keep else None)
