"""Features ("fibers") of an SE(3)-equivariant network and the maps that act on them degree by degree.

A feature is a dict ``{l: array [..., N, C_l, 2l+1]}``: for every degree l, C_l channels of
a type-l vector (2l+1 real components m, in e3nn-jax's real spherical-harmonics basis; for
l = 1 that basis is the Cartesian (x, y, z) itself, see docs/equivariant.md). A rotation R
acts on it as ``f_l -> f_l D_l(R)ᵀ`` (each channel's m-vector is multiplied by the
Wigner-D matrix D_l(R)). A *fiber* is the structure alone, ``{l: C_l}``.

Everything here acts on the channel axis or on rotation-invariant norms, never mixes the m
axis, which is why it commutes with every D_l(R).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jformer import layers

Array = jax.Array
Features = dict  # {int l: Array [..., N, C_l, 2l+1]}
Fiber = dict  # {int l: int C_l}


# ------------------------------------------------------------------ validation


def check_positions(name: str, pos) -> None:
    """Raise a ValueError naming ``name`` unless ``pos`` is coordinates [..., N, 3]."""
    shape = tuple(getattr(pos, "shape", ()))
    if len(shape) < 2 or shape[-1] != 3:
        raise ValueError(f"{name} must be coordinates [..., N, 3], got shape {shape}")


def check_fiber(name: str, fiber) -> Fiber:
    """``fiber`` as a ``{l: C_l}`` dict of ints (l >= 0, C_l >= 1); a ValueError naming ``name`` otherwise."""
    items = dict(fiber).items() if not isinstance(fiber, dict) else fiber.items()
    out = {}
    for l, c in items:
        if isinstance(l, bool) or not isinstance(l, int) or l < 0:
            raise ValueError(f"{name}: degrees must be ints >= 0, got {l!r} in {dict(items)}")
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"{name}: channels must be ints >= 1, got {name}[{l}] = {c!r}")
        out[l] = c
    if not out:
        raise ValueError(f"{name} must have at least one degree, got {fiber!r}")
    return dict(sorted(out.items()))


def fiber_of(feats: Features) -> Fiber:
    """The fiber ``{l: C_l}`` of a feature dict."""
    return {l: x.shape[-2] for l, x in sorted(feats.items())}


def check_features(name: str, feats, n_nodes: int | None = None, fiber: Fiber | None = None) -> None:
    """Raise a ValueError naming ``name`` unless ``feats`` is ``{l: [..., N, C_l, 2l+1]}``.

    ``n_nodes``: the N every degree must have (axis -3); ``fiber``: the ``{l: C_l}`` expected
    (same degrees, same channels).
    """
    if not isinstance(feats, dict) or not feats:
        raise ValueError(f"{name} must be a non-empty dict {{degree l: [N, C, 2l+1]}}, got {type(feats).__name__}")
    for l, x in feats.items():
        if isinstance(l, bool) or not isinstance(l, int) or l < 0:
            raise ValueError(f"{name}: degrees must be ints >= 0, got key {l!r}")
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) < 3 or shape[-1] != 2 * l + 1:
            raise ValueError(f"{name}[{l}] must be [..., N, C, 2l+1] = [..., N, C, {2 * l + 1}] "
                             f"for degree {l}, got shape {shape}")
        if n_nodes is not None and shape[-3] != n_nodes:
            raise ValueError(f"{name}[{l}] has {shape[-3]} nodes (shape {shape}), the coordinates have {n_nodes}")
    if fiber is not None and fiber_of(feats) != dict(fiber):
        raise ValueError(f"{name} has degrees/channels {fiber_of(feats)}, the model expects {dict(fiber)}")


def check_node_mask(name: str, mask, n_nodes: int) -> None:
    """Raise a ValueError naming ``name`` unless ``mask`` is a boolean [N] (or [..., N]) array."""
    shape = tuple(getattr(mask, "shape", ()))
    dtype = getattr(mask, "dtype", None)
    if len(shape) < 1 or shape[-1] != n_nodes or dtype != jnp.bool_:
        raise ValueError(f"{name} must be a boolean [N] = [{n_nodes}] node mask (True = real node), "
                         f"got shape {shape} dtype {dtype}")


def mask_features(feats: Features, mask: Array | None) -> Features:
    """Zero the rows of masked (padding) nodes: ``where(mask [N], f_l, 0)`` per degree.

    ``where``, not a product: garbage in a pad row may be inf or NaN, and 0 · NaN is NaN.
    """
    if mask is None:
        return feats
    return {l: jnp.where(mask[..., :, None, None], x, jnp.zeros((), x.dtype)) for l, x in feats.items()}


# --------------------------------------------------------------- linear maps


def init_normal_kernels(key: Array, specs: dict) -> dict:
    """``{name: {"kernel": N(0, std²) of shape}}`` for ``specs = {name: (shape, std)}``, from ONE draw.

    One ``jax.random.normal`` sliced into every kernel rather than one call per kernel: a
    degree-3 model has hundreds of small kernels, and each random call is a separate
    threefry program for XLA to compile (seconds in total, op by op or under ``jit``).
    """
    sizes = [math.prod(shape) for shape, _ in specs.values()]
    flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
    out, start = {}, 0
    for (name, (shape, std)), size in zip(specs.items(), sizes):
        out[name] = {"kernel": flat[start:start + size].reshape(shape) * std}
        start += size
    return out


def init_linear(key: Array, fiber_in: Fiber, fiber_out: Fiber) -> dict:
    """Per-degree channel mixing ``{"l{l}": {"kernel": [C_in_l, C_out_l]}}`` for each l in both fibers.

    Degree 0 also gets a ``bias`` [C_out_0] zeros (a constant is rotation invariant; for
    l > 0 it would not be). Kernels are N(0, 1 / C_in) so a unit-variance input stays unit
    variance.
    """
    degrees = [l for l in sorted(fiber_out) if l in fiber_in]
    params = init_normal_kernels(key, {f"l{l}": ((fiber_in[l], fiber_out[l]), 1.0 / math.sqrt(fiber_in[l]))
                                       for l in degrees})
    if 0 in degrees:
        params["l0"]["bias"] = jnp.zeros((fiber_out[0],), jnp.float32)
    return params


def linear(params: dict, feats: Features) -> Features:
    """Per-degree linear map: ``y_l[n, o, m] = sum_c f_l[n, c, m] W_l[c, o] (+ b_o for l = 0)``.

    feats ``{l: [..., N, C_in_l, 2l+1]}`` -> ``{l: [..., N, C_out_l, 2l+1]}`` for the degrees
    in ``params``. Equivariant because W_l never touches the m axis:
    ``linear(f D_lᵀ) = linear(f) D_lᵀ``.
    """
    out = {}
    for name, p in params.items():
        l = int(name[1:])
        y = jnp.einsum("...cm,co->...om", feats[l], p["kernel"].astype(feats[l].dtype))
        if "bias" in p:
            y = y + p["bias"].astype(y.dtype)[:, None]
        out[l] = y
    return out


def concat(*feats: Features) -> Features:
    """Concatenate features along the channel axis, degree by degree (missing degrees skipped)."""
    degrees = sorted({l for f in feats for l in f})
    return {l: jnp.concatenate([f[l] for f in feats if l in f], axis=-2) for l in degrees}


# ----------------------------------------------------------- nonlinearity


def safe_norm(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """``sqrt(sum x² + eps)`` over ``axis``: smooth, so the gradient at x = 0 is 0, not NaN
    (the gradient of ``sqrt`` at 0 is infinite and times 0 gives NaN)."""
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=axis) + eps)


def _compute_dtype(x: Array):
    # At least float32 for the statistics (principle 8), but keep float64 when enabled.
    return jnp.promote_types(x.dtype, jnp.float32)


def layer_norm(params: dict, x: Array, *, eps: float = 1e-5) -> Array:
    """LayerNorm over the last axis, ``(x - mean) / sqrt(var + eps) · scale + bias``; x [..., C].

    ``layers.layer_norm`` computes in float32; this one keeps float64 inputs in float64
    (the equivariance tests run at 1e-10).
    """
    dt = _compute_dtype(x)
    x32 = x.astype(dt)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * params["scale"].astype(dt)
    return (y + params["bias"].astype(dt)).astype(x.dtype)


def init_norm_nonlinearity(fiber: Fiber) -> dict:
    """Norm nonlinearity parameters ``{"l{l}": {"scale": ones [C_l], "bias": zeros [C_l]}}``."""
    return {f"l{l}": layers.init_layer_norm(c) for l, c in sorted(fiber.items())}


def norm_nonlinearity(params: dict, feats: Features, *, eps: float = 1e-12) -> Features:
    """The SE(3)-Transformer's norm nonlinearity (Fuchs et al. 2020, eq. 13 / GNormSE3).

        y_l = f_l · ReLU(LN(|f_l|)) / |f_l|,    |f_l|[n, c] = sqrt(sum_m f_l[n, c, m]² + eps)

    feats ``{l: [..., N, C_l, 2l+1]}`` -> same shapes. The norm over m is rotation invariant, so
    only the (invariant) length of each channel's vector changes, never its direction.
    LayerNorm runs over the C_l channels of a degree; with C_l = 1 it would map every norm to
    its bias, so a single channel gets the affine ``|f| · scale + bias`` instead. ``eps``
    makes the norm smooth at 0 (no NaN gradient for a zero feature).
    """
    out = {}
    for l, x in feats.items():
        p = params[f"l{l}"]
        norm = safe_norm(x, axis=-1, eps=eps)  # [..., N, C]
        if x.shape[-2] == 1:
            gate = norm * p["scale"].astype(norm.dtype) + p["bias"].astype(norm.dtype)
        else:
            gate = layer_norm(p, norm)
        out[l] = x * (jax.nn.relu(gate) / norm)[..., None]
    return out
