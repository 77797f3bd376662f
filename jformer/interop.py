"""Load the parameters of PyTorch Transformer modules into jformer parameter pytrees.

Every ``from_torch_*`` function reads a ``torch.nn`` module's weights and returns
the jformer pytree (float32 ``jax.Array`` leaves) that computes the same function:
the same inputs give the same outputs up to float32 rounding. Shape legend:
B batch, T query length, S key length, D model width, N heads, H = D / N head
width, F feed-forward width, L layers.

The mapping, module by module:

==============================================  ==============================================
torch                                           jformer
==============================================  ==============================================
``nn.Linear`` weight [out, in], bias [out]       ``{"kernel": [in, out], "bias": [out]}``
``nn.LayerNorm`` weight [D], bias [D]            ``{"scale": [D], "bias": [D]}`` (see ``_layer_norm``)
``nn.MultiheadAttention``                        ``init_multi_head_attention`` layout
``nn.TransformerEncoderLayer``                   ``blocks.init_encoder_layer`` layout
``nn.TransformerDecoderLayer``                   ``blocks.init_decoder_layer`` layout
``nn.TransformerEncoder`` / ``Decoder``          ``models.init_encoder`` / ``init_decoder``
``nn.Transformer``                               ``{"encoder": ..., "decoder": ...}`` + config
``nn.LSTM`` / ``nn.GRU``                         ``recurrent.init_rnn_layer`` layout + config
==============================================  ==============================================

Torch computes a linear layer as ``x @ W.T + b``; jformer as ``x @ kernel + bias``,
so every kernel is a transposed torch weight, reshaped to split or merge the head
axis (torch lays the N heads of width H out head-major along D: feature
``n * H + h`` is head n, channel h).

Only weights are carried. Dropout (rates and RNG) is not: the returned configs
have ``dropout_rate = attention_dropout_rate = 0.0``, which matches a torch
module in ``eval()`` mode. ``batch_first`` changes no weight and is ignored:
jformer is always batch-major ([B, T, D]).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jformer.models import TransformerConfig
from jformer.recurrent import RNNConfig

if TYPE_CHECKING:  # annotations only: torch is imported when a function needs it (``_torch``)
    import torch
    from torch import nn

__all__ = [
    "config_from_torch",
    "from_torch_decoder",
    "from_torch_decoder_layer",
    "from_torch_encoder",
    "from_torch_encoder_layer",
    "from_torch_multihead_attention",
    "from_torch_rnn",
    "from_torch_transformer",
]


# --------------------------------------------------------------------- helpers


def _torch():
    """The ``torch`` module, imported on first use so that ``import jformer.interop`` works without it."""
    try:
        import torch
    except ImportError as e:
        raise ImportError("jformer.interop reads PyTorch modules and needs torch, which is not installed: "
                          "pip install torch==2.13.0") from e
    return torch


def _array(t: torch.Tensor) -> jax.Array:
    """A torch tensor as a float32 jax array: a copy, so later in-place torch updates do not leak in."""
    return jnp.asarray(np.array(t.detach().to(device="cpu", dtype=_torch().float32).numpy(), copy=True))


def _check_type(module, expected: type | tuple[type, ...], what: str) -> None:
    if not isinstance(module, expected):
        names = " or ".join(t.__qualname__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        raise TypeError(f"{what} must be a torch.nn.{names}, got {type(module).__qualname__}")


def _dense(weight: torch.Tensor, bias: torch.Tensor | None, in_shape: Sequence[int],
           out_shape: Sequence[int]) -> dict:
    """A torch linear map ``x @ weight.T + bias`` as jformer ``dense`` parameters.

    weight [prod(out_shape), prod(in_shape)] -> kernel [*in_shape, *out_shape];
    bias [prod(out_shape)] -> bias [*out_shape] (absent when ``bias`` is None).
    """
    params = {"kernel": _array(weight).T.reshape(*in_shape, *out_shape)}
    if bias is not None:
        params["bias"] = _array(bias).reshape(*out_shape)
    return params


def _linear(linear: nn.Linear) -> dict:
    """``nn.Linear`` weight [out, in], bias [out] -> ``{"kernel": [in, out], "bias": [out]}``."""
    nn = _torch().nn
    _check_type(linear, nn.Linear, "a feed-forward projection")
    return _dense(linear.weight, linear.bias, (linear.in_features,), (linear.out_features,))


def _layer_norm(norm: nn.LayerNorm, use_bias: bool) -> dict:
    """``nn.LayerNorm`` over [D] -> ``{"scale": [D], "bias": [D]}`` (ones where torch has no weight).

    ``use_bias`` is the imported config's (the layers' linear maps have biases). A torch
    norm without a bias (``LayerNorm(bias=False)``, which ``bias=False`` Transformer
    layers use) gives no ``bias`` leaf when ``use_bias`` is False, as jformer's
    ``use_bias=False`` norms have none, and zeros when it is True, so the tree keeps
    jformer's layout either way. A torch bias is always carried (``layer_norm`` adds
    it whenever present), so the computed function is the module's.
    """
    nn = _torch().nn
    _check_type(norm, nn.LayerNorm, "a norm")
    if len(norm.normalized_shape) != 1:
        raise ValueError(f"only a LayerNorm over the last axis is supported, got normalized_shape "
                         f"{tuple(norm.normalized_shape)}")
    (d,) = norm.normalized_shape
    scale = jnp.ones((d,), jnp.float32) if norm.weight is None else _array(norm.weight)
    if norm.bias is not None:
        return {"scale": scale, "bias": _array(norm.bias)}
    return {"scale": scale, "bias": jnp.zeros((d,), jnp.float32)} if use_bias else {"scale": scale}


def _has_bias(layer: nn.Module) -> bool:
    """``TransformerConfig.use_bias`` of a torch encoder / decoder layer (its linear maps have biases)."""
    return layer.linear1.bias is not None


def _stack(per_layer: list[dict]) -> dict:
    """Per-layer parameter pytrees stacked on a leading [L] axis."""
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *per_layer)


# ------------------------------------------------------------------- attention


def from_torch_multihead_attention(mha: nn.MultiheadAttention) -> dict:
    """``nn.MultiheadAttention`` -> ``jformer.multi_head_attention`` parameters.

    With E = ``embed_dim`` = D, N = ``num_heads``, H = D / N and Dkv = ``kdim`` (= ``vdim``):

    * packed ``in_proj_weight`` [3D, D] (used when kdim = vdim = D) is split into
      W_q, W_k, W_v [D, D] (rows 0:D, D:2D, 2D:3D), and ``in_proj_bias`` [3D] likewise;
    * separate ``q_proj_weight`` [D, D], ``k_proj_weight`` [D, Dkv], ``v_proj_weight`` [D, Dkv];
    * ``query`` kernel = W_qᵀ reshaped to [D, N, H], bias [N, H]; ``key`` / ``value``
      kernels [Dkv, N, H], biases [N, H];
    * ``out_proj.weight`` [D, D] -> ``out`` kernel = Wᵀ reshaped to [N, H, D], bias [D].

    ``bias=False`` gives kernels only. Torch's ``key_padding_mask`` (True = ignore)
    corresponds to the jformer mask ``~key_padding_mask[:, None, None, :]`` (True =
    may attend). Attention dropout is not carried.

    Raises:
      TypeError: ``mha`` is not an ``nn.MultiheadAttention``.
      ValueError: ``add_bias_kv`` / ``add_zero_attn`` (no jformer counterpart), or
        kdim != vdim (jformer reads keys and values from one input [B, S, Dkv]).
    """
    nn = _torch().nn
    _check_type(mha, nn.MultiheadAttention, "mha")
    if mha.bias_k is not None or mha.bias_v is not None:
        raise ValueError("nn.MultiheadAttention with add_bias_kv=True is not supported")
    if mha.add_zero_attn:
        raise ValueError("nn.MultiheadAttention with add_zero_attn=True is not supported")
    if mha.kdim != mha.vdim:
        raise ValueError(f"nn.MultiheadAttention with kdim={mha.kdim} != vdim={mha.vdim} is not supported: "
                         "jformer attention projects keys and values from the same input")
    D, N, H = mha.embed_dim, mha.num_heads, mha.head_dim
    if mha.in_proj_weight is not None:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3, dim=0)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b_q = b_k = b_v = None
    if mha.in_proj_bias is not None:
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3, dim=0)
    return {
        "query": _dense(w_q, b_q, (D,), (N, H)),
        "key": _dense(w_k, b_k, (mha.kdim,), (N, H)),
        "value": _dense(w_v, b_v, (mha.vdim,), (N, H)),
        "out": _dense(mha.out_proj.weight, mha.out_proj.bias, (N, H), (D,)),
    }


# ---------------------------------------------------------------------- layers


def _activation(layer: nn.Module) -> str:
    """``"relu"`` or ``"gelu"`` from a torch layer's ``activation`` attribute.

    Torch turns the strings "relu" / "gelu" into ``F.relu`` / ``F.gelu``. The
    attribute is read rather than the encoder layer's ``activation_relu_or_gelu``
    flag because that flag exists on encoder layers only and also marks a
    tanh-approximate ``nn.GELU`` as GELU, which jformer (exact erf GELU) would not match.
    """
    nn = _torch().nn
    F = nn.functional
    act = getattr(layer, "activation", F.relu)  # torch's own default for old pickles
    if act is F.relu or isinstance(act, nn.ReLU):
        return "relu"
    if act is F.gelu or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    raise ValueError(f"{type(layer).__qualname__} activation {act!r} is not supported: jformer can "
                     "import torch layers with activation F.relu / nn.ReLU or exact F.gelu / nn.GELU()")


def _layer_config(layer: nn.Module) -> dict:
    """The TransformerConfig fields an encoder or decoder layer fixes."""
    nn = _torch().nn
    norms = [m for name, m in layer.named_children() if name.startswith("norm")]
    for norm in norms:
        _check_type(norm, nn.LayerNorm, f"{type(layer).__qualname__} norm")
    eps = {n.eps for n in norms}
    if len(eps) != 1:
        raise ValueError(f"{type(layer).__qualname__} norms have different eps {sorted(eps)}; "
                         "jformer uses one norm_eps")
    return {
        "d_model": layer.self_attn.embed_dim,
        "num_heads": layer.self_attn.num_heads,
        "d_ff": layer.linear1.out_features,
        "activation": _activation(layer),
        "norm_position": "pre" if layer.norm_first else "post",
        "norm_eps": eps.pop(),
        "use_bias": _has_bias(layer),
    }


def _ffn(layer: nn.Module) -> dict:
    return {"wi": _linear(layer.linear1), "wo": _linear(layer.linear2)}


def from_torch_encoder_layer(layer: nn.TransformerEncoderLayer) -> dict:
    """``nn.TransformerEncoderLayer`` -> ``jformer.blocks.encoder_layer`` parameters.

    ``self_attn`` -> ``self_attn`` (see ``from_torch_multihead_attention``),
    ``norm1`` -> ``self_attn_norm``, ``linear1`` [F, D] -> ``ffn.wi`` kernel [D, F],
    ``linear2`` [D, F] -> ``ffn.wo`` kernel [F, D], ``norm2`` -> ``ffn_norm`` ([D] each).
    ``norm_first`` becomes ``TransformerConfig.norm_position`` (see ``config_from_torch``).

    Raises:
      TypeError: not an ``nn.TransformerEncoderLayer``.
      ValueError: an activation other than ReLU / exact GELU.
    """
    nn = _torch().nn
    _check_type(layer, nn.TransformerEncoderLayer, "layer")
    _activation(layer)  # raise before copying weights of a layer jformer cannot run
    bias = _has_bias(layer)
    return {
        "self_attn": from_torch_multihead_attention(layer.self_attn),
        "self_attn_norm": _layer_norm(layer.norm1, bias),
        "ffn": _ffn(layer),
        "ffn_norm": _layer_norm(layer.norm2, bias),
    }


def from_torch_decoder_layer(layer: nn.TransformerDecoderLayer) -> dict:
    """``nn.TransformerDecoderLayer`` -> ``jformer.blocks.decoder_layer`` parameters.

    ``self_attn`` -> ``self_attn``, ``norm1`` -> ``self_attn_norm``;
    ``multihead_attn`` -> ``cross_attn``, ``norm2`` -> ``cross_attn_norm``;
    ``linear1`` [F, D] / ``linear2`` [D, F] -> ``ffn.wi`` [D, F] / ``ffn.wo`` [F, D],
    ``norm3`` -> ``ffn_norm``.

    Raises:
      TypeError: not an ``nn.TransformerDecoderLayer``.
      ValueError: an activation other than ReLU / exact GELU.
    """
    nn = _torch().nn
    _check_type(layer, nn.TransformerDecoderLayer, "layer")
    _activation(layer)  # raise before copying weights of a layer jformer cannot run
    bias = _has_bias(layer)
    return {
        "self_attn": from_torch_multihead_attention(layer.self_attn),
        "self_attn_norm": _layer_norm(layer.norm1, bias),
        "cross_attn": from_torch_multihead_attention(layer.multihead_attn),
        "cross_attn_norm": _layer_norm(layer.norm2, bias),
        "ffn": _ffn(layer),
        "ffn_norm": _layer_norm(layer.norm3, bias),
    }


# ---------------------------------------------------------------------- stacks


def _stack_config(stack: nn.Module) -> dict:
    """Config fields of a TransformerEncoder / TransformerDecoder; all its layers must agree."""
    nn = _torch().nn
    configs = [_layer_config(layer) for layer in stack.layers]
    if not configs:
        raise ValueError(f"{type(stack).__qualname__} has no layers")
    for i, c in enumerate(configs[1:], start=1):
        if c != configs[0]:
            diff = {k: (configs[0][k], c[k]) for k in c if c[k] != configs[0][k]}
            raise ValueError(f"{type(stack).__qualname__} layer {i} differs from layer 0 in {diff}; "
                             "a jformer stack shares one configuration")
    final_norm = stack.norm is not None
    if final_norm:
        _check_type(stack.norm, nn.LayerNorm, f"{type(stack).__qualname__}.norm")
        if stack.norm.eps != configs[0]["norm_eps"]:
            raise ValueError(f"{type(stack).__qualname__}.norm eps {stack.norm.eps} differs from the "
                             f"layers' eps {configs[0]['norm_eps']}; jformer uses one norm_eps")
    return {**configs[0], "final_norm": final_norm}


def _from_stack(stack: nn.Module, from_layer) -> dict:
    _stack_config(stack)  # validates before any weight is copied
    params = {"layers": _stack([from_layer(layer) for layer in stack.layers])}
    if stack.norm is not None:
        params["final_norm"] = _layer_norm(stack.norm, _has_bias(stack.layers[0]))
    return params


def from_torch_encoder(enc: nn.TransformerEncoder) -> dict:
    """``nn.TransformerEncoder`` -> ``jformer.models.encoder`` parameters.

    ``{"layers": <from_torch_encoder_layer of each layer, stacked on a leading [L] axis>,
    "final_norm": {"scale": [D], "bias": [D]}}``, with ``final_norm`` only if
    ``enc.norm`` is not None (``jformer.models.encoder`` applies it iff present).
    Use ``config_from_torch(enc)`` for the matching config. A padded source
    (torch ``src_key_padding_mask`` True = pad) is jformer
    ``mask=~src_key_padding_mask[:, None, None, :]``.

    Raises:
      TypeError: not an ``nn.TransformerEncoder``, or a final norm that is not a LayerNorm.
      ValueError: layers that differ in configuration, or an unsupported activation.
    """
    nn = _torch().nn
    _check_type(enc, nn.TransformerEncoder, "enc")
    return _from_stack(enc, from_torch_encoder_layer)


def from_torch_decoder(dec: nn.TransformerDecoder) -> dict:
    """``nn.TransformerDecoder`` -> ``jformer.models.decoder`` parameters.

    ``{"layers": <from_torch_decoder_layer of each layer, stacked on [L]>,
    "final_norm": [D] scale / bias}`` (``final_norm`` only if ``dec.norm`` is not None).
    Torch's ``tgt_mask`` / ``memory_key_padding_mask`` map to jformer's
    ``self_mask`` (e.g. ``causal_mask(T)``) / ``cross_mask`` (True = may attend).

    Raises:
      TypeError: not an ``nn.TransformerDecoder``, or a final norm that is not a LayerNorm.
      ValueError: layers that differ in configuration, or an unsupported activation.
    """
    nn = _torch().nn
    _check_type(dec, nn.TransformerDecoder, "dec")
    return _from_stack(dec, from_torch_decoder_layer)


# ------------------------------------------------------------------ the model


def config_from_torch(module: nn.Module) -> TransformerConfig:
    """The ``TransformerConfig`` of a torch Transformer, encoder stack or decoder stack.

    Read off the module: ``d_model``, ``num_heads``, ``d_ff``, ``activation``
    ("relu" / "gelu"), ``norm_position`` ("pre" iff ``norm_first``), ``norm_eps``
    (``norm1.eps``; all norms must agree), ``use_bias``, ``final_norm`` (the stack
    has a ``.norm``), ``num_layers`` (encoder depth, or the decoder depth for a
    lone decoder stack) and, for ``nn.Transformer``, ``num_decoder_layers``.
    ``dropout_rate`` and ``attention_dropout_rate`` are 0.0: dropout is not
    carried. Fields with no torch counterpart (vocabulary, positions, ...) keep
    their defaults: the config describes the stacks only.

    Raises:
      TypeError: ``module`` is none of ``nn.Transformer``, ``nn.TransformerEncoder``,
        ``nn.TransformerDecoder``.
      ValueError: settings jformer cannot express (see ``from_torch_transformer``).
    """
    nn = _torch().nn
    if isinstance(module, nn.Transformer):
        _check_type(module.encoder, nn.TransformerEncoder, "nn.Transformer.encoder")
        _check_type(module.decoder, nn.TransformerDecoder, "nn.Transformer.decoder")
        enc, dec = _stack_config(module.encoder), _stack_config(module.decoder)
        if enc != dec:
            diff = {k: (enc[k], dec[k]) for k in enc if enc[k] != dec[k]}
            raise ValueError(f"nn.Transformer encoder and decoder differ in {diff} (encoder, decoder); "
                             "a jformer TransformerConfig describes both with one setting")
        fields = {**enc, "num_layers": len(module.encoder.layers),
                  "num_decoder_layers": len(module.decoder.layers)}
    else:
        _check_type(module, (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder), "module")
        fields = {**_stack_config(module), "num_layers": len(module.layers)}
    return TransformerConfig(**fields, dropout_rate=0.0, attention_dropout_rate=0.0)


def from_torch_transformer(model: nn.Transformer) -> tuple[TransformerConfig, dict]:
    """``nn.Transformer`` -> (``TransformerConfig``, ``{"encoder": ..., "decoder": ...}``).

    The params are ``from_torch_encoder(model.encoder)`` and
    ``from_torch_decoder(model.decoder)``: the layouts of ``jformer.models.init_encoder``
    / ``init_decoder``, run by ``jformer.models.encoder`` / ``decoder``. Note that
    ``nn.Transformer`` gives both stacks a final LayerNorm even with
    ``norm_first=False``, so the config has ``final_norm=True``. Torch's
    ``model(src, tgt, src_key_padding_mask=p, memory_key_padding_mask=p, tgt_mask=causal)``
    is, with ``valid = ~p``::

        memory, _, _ = encoder(params["encoder"], src, cfg=cfg, mask=valid[:, None, None, :])
        out, _, _ = decoder(params["decoder"], tgt, memory, cfg=cfg,
                            self_mask=causal_mask(T), cross_mask=valid[:, None, None, :])

    Dropout is not carried (``dropout_rate=0.0``): compare with the module in ``eval()``.

    Raises:
      TypeError: not an ``nn.Transformer`` (or a custom encoder / decoder of another type).
      ValueError: an activation other than ReLU / exact GELU, encoder and decoder
        settings that differ, or norms with different eps.
    """
    nn = _torch().nn
    _check_type(model, nn.Transformer, "model")
    cfg = config_from_torch(model)
    return cfg, {"encoder": from_torch_encoder(model.encoder), "decoder": from_torch_decoder(model.decoder)}


def from_torch_rnn(module: nn.LSTM | nn.GRU) -> tuple[RNNConfig, dict]:
    """``nn.LSTM`` / ``nn.GRU`` -> (``RNNConfig``, ``recurrent.rnn_layer`` parameters).

    Layer l, direction d (``forward``; ``backward`` from the ``_reverse`` weights):
    ``weight_ih_l{l}`` [G·Hd, D_in] -> ``input`` kernel [D_in, G, Hd], ``weight_hh_l{l}``
    [G·Hd, Hd] -> ``hidden`` kernel [Hd, G, Hd], biases [G·Hd] -> [G, Hd]: torch stacks the
    G gates (LSTM i, f, g, o; GRU r, z, n) along its rows, gate-major, as jformer's gate axis.
    ``bias=False`` gives kernels only. The config has ``cell``, ``d_embed`` = input size,
    ``d_hidden``, ``num_layers``, ``bidirectional`` and ``dropout_rate=0.0``; ``batch_first``
    changes no weight. Torch's ``(h_0, c_0)`` [L·dirs, B, Hd] row ``l·dirs + d`` is
    ``state[l][d]``, and a ``pack_padded_sequence`` is ``Context(cfg, valid=...)``.

    Raises:
      TypeError: neither ``nn.LSTM`` nor ``nn.GRU``.
      ValueError: an LSTM with ``proj_size`` (no jformer counterpart).
    """
    nn = _torch().nn
    _check_type(module, (nn.LSTM, nn.GRU), "module")
    if getattr(module, "proj_size", 0):
        raise ValueError(f"nn.LSTM with proj_size={module.proj_size} is not supported")
    cell, H = ("lstm" if isinstance(module, nn.LSTM) else "gru"), module.hidden_size
    G = 4 if cell == "lstm" else 3

    def direction(l: int, suffix: str) -> dict:
        w_ih, w_hh = getattr(module, f"weight_ih_l{l}{suffix}"), getattr(module, f"weight_hh_l{l}{suffix}")
        b_ih, b_hh = (getattr(module, f"bias_{n}_l{l}{suffix}") if module.bias else None for n in ("ih", "hh"))
        return {"input": _dense(w_ih, b_ih, (w_ih.shape[1],), (G, H)), "hidden": _dense(w_hh, b_hh, (H,), (G, H))}

    cfg = RNNConfig(cell=cell, d_embed=module.input_size, d_hidden=H, num_layers=module.num_layers,
                    bidirectional=module.bidirectional, dropout_rate=0.0)
    return cfg, {"layers": [{d: direction(l, s) for d, s in zip(cfg.directions, ("", "_reverse"))}
                            for l in range(module.num_layers)]}
