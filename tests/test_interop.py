"""Parity of jformer with PyTorch modules whose weights were loaded by jformer.interop.

Torch runs in eval() mode with dropout 0.0 and with autograd enabled, which keeps
it off its inference "fast path" (nested tensors zero the padded positions).
Masks: torch key_padding_mask True = ignore; jformer mask True = may attend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import jformer
from jformer import interop
from jformer.attention import multi_head_attention
from jformer.blocks import Context, decoder_layer, encoder_layer, stack
from jformer.models import init_decoder, init_encoder

D, N, FF, L = 32, 4, 64, 2
B, S, T = 3, 7, 5
TOL = 1e-4

pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy()


def _randomize_vectors(module: nn.Module) -> nn.Module:
    """Perturb every 1-D parameter (biases, norm scales): torch initialises them to
    zeros / ones, which would hide a swapped bias or norm in the mapping."""
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return module.eval()


def _max_diff(jax_out, torch_out: torch.Tensor) -> float:
    return float(np.max(np.abs(np.asarray(jax_out) - _np(torch_out))))


def _src_padding() -> torch.Tensor:
    """Key padding [B, S], True = pad: lengths 7, 4, 2 (every row keeps a valid key)."""
    return torch.arange(S)[None, :] >= torch.tensor([S, 4, 2])[:, None]


def _key_mask(pad: torch.Tensor) -> jax.Array:
    """torch padding [B, S] (True = ignore) -> jformer mask [B, 1, 1, S] (True = may attend)."""
    return jnp.asarray(~_np(pad))[:, None, None, :]


# ------------------------------------------------------------------- attention


@pytest.mark.parametrize("bias", [True, False])
def test_self_attention_matches_torch(bias):
    torch.manual_seed(0)
    mha = _randomize_vectors(nn.MultiheadAttention(D, N, dropout=0.0, bias=bias, batch_first=True))
    assert mha.in_proj_weight is not None  # the packed [3D, D] projection
    x, pad = torch.randn(B, S, D), _src_padding()
    out_t, w_t = mha(x, x, x, key_padding_mask=pad, need_weights=True, average_attn_weights=False)
    _, w_avg_t = mha(x, x, x, key_padding_mask=pad, need_weights=True, average_attn_weights=True)

    params = interop.from_torch_multihead_attention(mha)
    assert params["query"]["kernel"].shape == (D, N, D // N)
    assert params["out"]["kernel"].shape == (N, D // N, D)
    assert ("bias" in params["query"]) == bias and ("bias" in params["out"]) == bias
    out_j, aux = multi_head_attention(params, jnp.asarray(_np(x)), mask=_key_mask(pad),
                                      return_weights=True)
    w_j = aux["attention"]

    assert w_j.shape == w_t.shape == (B, N, S, S)
    assert _max_diff(out_j, out_t) <= TOL
    assert _max_diff(w_j, w_t) <= TOL
    assert _max_diff(w_j.mean(axis=1), w_avg_t) <= TOL
    # Padded keys get no weight in either library.
    assert float(jnp.max(jnp.where(_key_mask(pad), 0.0, w_j))) == 0.0


@pytest.mark.parametrize("bias", [True, False])
def test_cross_attention_with_other_kv_width_matches_torch(bias):
    torch.manual_seed(1)
    kv_dim = 24
    mha = _randomize_vectors(nn.MultiheadAttention(D, N, dropout=0.0, bias=bias, kdim=kv_dim,
                                                   vdim=kv_dim, batch_first=True))
    assert mha.in_proj_weight is None and mha.k_proj_weight.shape == (D, kv_dim)
    q, kv, pad = torch.randn(B, T, D), torch.randn(B, S, kv_dim), _src_padding()
    out_t, w_t = mha(q, kv, kv, key_padding_mask=pad, need_weights=True, average_attn_weights=False)

    params = interop.from_torch_multihead_attention(mha)
    assert params["key"]["kernel"].shape == params["value"]["kernel"].shape == (kv_dim, N, D // N)
    out_j, aux = multi_head_attention(params, jnp.asarray(_np(q)), jnp.asarray(_np(kv)),
                                      mask=_key_mask(pad), return_weights=True)
    w_j = aux["attention"]

    assert out_j.shape == (B, T, D) and w_j.shape == (B, N, T, S)
    assert _max_diff(out_j, out_t) <= TOL
    assert _max_diff(w_j, w_t) <= TOL


def test_unsupported_attention_raises():
    with pytest.raises(ValueError, match="kdim=24 != vdim=16"):
        interop.from_torch_multihead_attention(nn.MultiheadAttention(D, N, kdim=24, vdim=16))
    with pytest.raises(ValueError, match="add_bias_kv"):
        interop.from_torch_multihead_attention(nn.MultiheadAttention(D, N, add_bias_kv=True))
    with pytest.raises(ValueError, match="add_zero_attn"):
        interop.from_torch_multihead_attention(nn.MultiheadAttention(D, N, add_zero_attn=True))
    with pytest.raises(TypeError, match="MultiheadAttention.*got Linear"):
        interop.from_torch_multihead_attention(nn.Linear(D, D))


# ------------------------------------------------------------- full Transformer


def _run_transformer(params, cfg, src, tgt, pad, exe=None):
    exe = exe or jformer.ExecConfig()
    memory, _ = stack(encoder_layer, params["encoder"], jnp.asarray(_np(src)),
                      Context(cfg, exe, mask=_key_mask(pad)))
    out, _ = stack(decoder_layer, params["decoder"], jnp.asarray(_np(tgt)),
                   Context(cfg, exe, mask=jformer.causal_mask(T), memory=memory, memory_mask=_key_mask(pad)))
    return out


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_matches_torch(norm_first, activation):
    torch.manual_seed(2)
    model = _randomize_vectors(nn.Transformer(
        d_model=D, nhead=N, num_encoder_layers=L, num_decoder_layers=L + 1, dim_feedforward=FF,
        dropout=0.0, activation=activation, layer_norm_eps=1e-6, batch_first=True,
        norm_first=norm_first))
    src, tgt, pad = torch.randn(B, S, D), torch.randn(B, T, D), _src_padding()
    causal = nn.Transformer.generate_square_subsequent_mask(T)
    # Autograd on: torch takes its reference path, not the nested-tensor fast path.
    out_t = model(src, tgt, tgt_mask=causal, src_key_padding_mask=pad,
                  memory_key_padding_mask=pad)

    cfg, params = interop.from_torch_transformer(model)
    assert (cfg.d_model, cfg.num_heads, cfg.d_ff) == (D, N, FF)
    assert (cfg.num_layers, cfg.num_decoder_layers) == (L, L + 1)
    assert cfg.activation == activation
    assert cfg.norm_position == ("pre" if norm_first else "post")
    assert cfg.final_norm is True and cfg.norm_eps == 1e-6
    assert cfg.dropout_rate == 0.0 and cfg.attention_dropout_rate == 0.0

    for scan in (True, False):
        out_j = _run_transformer(params, cfg, src, tgt, pad, jformer.ExecConfig(scan_layers=scan))
        assert out_j.shape == (B, T, D)
        assert _max_diff(out_j, out_t) <= TOL, f"scan_layers={scan}"


def test_bias_free_transformer_matches_torch():
    """bias=False: no linear or LayerNorm bias in torch, none in jformer, same outputs."""
    torch.manual_seed(5)
    model = _randomize_vectors(nn.Transformer(
        d_model=D, nhead=N, num_encoder_layers=L, num_decoder_layers=L, dim_feedforward=FF,
        dropout=0.0, activation="gelu", batch_first=True, norm_first=True, bias=False))
    src, tgt, pad = torch.randn(B, S, D), torch.randn(B, T, D), _src_padding()
    causal = nn.Transformer.generate_square_subsequent_mask(T)
    out_t = model(src, tgt, tgt_mask=causal, src_key_padding_mask=pad, memory_key_padding_mask=pad)
    cfg, params = interop.from_torch_transformer(model)
    assert cfg.use_bias is False
    assert not any("bias" in jax.tree_util.keystr(path)
                   for path, _ in jax.tree_util.tree_leaves_with_path(params))
    assert _max_diff(_run_transformer(params, cfg, src, tgt, pad), out_t) <= TOL


def test_transformer_params_match_jformer_layout():
    """Imported params have the tree structure and shapes that init_encoder / init_decoder make."""
    model = nn.Transformer(d_model=D, nhead=N, num_encoder_layers=L, num_decoder_layers=L + 1,
                           dim_feedforward=FF, bias=False, batch_first=True)
    cfg, params = interop.from_torch_transformer(model)
    assert cfg.use_bias is False
    key = jax.random.PRNGKey(0)
    for name, init in (("encoder", init_encoder), ("decoder", init_decoder)):
        expected = jax.eval_shape(lambda k, init=init: init(k, cfg), key)
        got = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params[name])
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected), name
        assert jax.tree_util.tree_leaves(got) == jax.tree_util.tree_leaves(expected), name
    # torch LayerNorm(bias=False) has no bias, nor do jformer's use_bias=False norms.
    assert "bias" not in params["decoder"]["final_norm"]
    assert "bias" not in params["encoder"]["layers"]["self_attn_norm"]


def test_bias_free_layer_norm_with_biased_linears_gets_zero_bias():
    """A torch LayerNorm(bias=False) in a stack whose linear maps have biases gets zeros,
    so the tree is still the use_bias=True layout (and computes the same function)."""
    layer = nn.TransformerEncoderLayer(D, N, FF, dropout=0.0, batch_first=True, norm_first=True)
    enc = nn.TransformerEncoder(layer, 1, norm=nn.LayerNorm(D, bias=False), enable_nested_tensor=False)
    cfg, params = interop.config_from_torch(enc), interop.from_torch_encoder(enc)
    assert cfg.use_bias is True
    assert float(jnp.max(jnp.abs(params["final_norm"]["bias"]))) == 0.0
    expected = jax.eval_shape(lambda k: init_encoder(k, cfg), jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(expected)


# -------------------------------------------------------------- stacks alone


@pytest.mark.parametrize("norm_first,final_norm", [(False, False), (True, True)])
def test_encoder_matches_torch(norm_first, final_norm):
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(D, N, FF, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=norm_first)
    enc = _randomize_vectors(nn.TransformerEncoder(
        layer, L, norm=nn.LayerNorm(D) if final_norm else None, enable_nested_tensor=False))
    src, pad = torch.randn(B, S, D), _src_padding()
    out_t = enc(src, src_key_padding_mask=pad)

    cfg = interop.config_from_torch(enc)
    params = interop.from_torch_encoder(enc)
    assert cfg.final_norm is final_norm and ("final_norm" in params) is final_norm
    assert cfg.num_layers == L and cfg.activation == "gelu"
    assert params["layers"]["ffn"]["wi"]["kernel"].shape == (L, D, FF)
    for scan in (True, False):
        out_j, _ = stack(encoder_layer, params, jnp.asarray(_np(src)),
                         Context(cfg, jformer.ExecConfig(scan_layers=scan), mask=_key_mask(pad)))
        assert _max_diff(out_j, out_t) <= TOL, f"scan_layers={scan}"


def test_decoder_matches_torch():
    torch.manual_seed(4)
    layer = nn.TransformerDecoderLayer(D, N, FF, dropout=0.0, batch_first=True)
    dec = _randomize_vectors(nn.TransformerDecoder(layer, L))
    tgt, memory, pad = torch.randn(B, T, D), torch.randn(B, S, D), _src_padding()
    causal = nn.Transformer.generate_square_subsequent_mask(T)
    out_t = dec(tgt, memory, tgt_mask=causal, memory_key_padding_mask=pad)

    cfg = interop.config_from_torch(dec)
    params = interop.from_torch_decoder(dec)
    assert cfg.num_layers == L and cfg.norm_position == "post" and not cfg.final_norm
    assert "final_norm" not in params
    for scan in (True, False):
        out_j, _ = stack(decoder_layer, params, jnp.asarray(_np(tgt)),
                         Context(cfg, jformer.ExecConfig(scan_layers=scan), mask=jformer.causal_mask(T),
                                 memory=jnp.asarray(_np(memory)), memory_mask=_key_mask(pad)))
        assert _max_diff(out_j, out_t) <= TOL, f"scan_layers={scan}"


# --------------------------------------------------------------------- errors


def test_unsupported_activation_raises():
    model = nn.Transformer(D, N, 1, 1, FF, activation=F.silu)
    tanh_gelu = nn.GELU(approximate="tanh")  # not jformer's exact (erf) GELU
    cases = [
        (interop.from_torch_encoder_layer, nn.TransformerEncoderLayer(D, N, FF, activation=F.silu)),
        (interop.from_torch_decoder_layer, nn.TransformerDecoderLayer(D, N, FF, activation=F.silu)),
        (interop.from_torch_encoder, model.encoder),
        (interop.from_torch_decoder, model.decoder),
        (interop.config_from_torch, model),
        (interop.from_torch_transformer, model),
        (interop.from_torch_encoder_layer, nn.TransformerEncoderLayer(D, N, FF, activation=tanh_gelu)),
        (interop.from_torch_decoder_layer, nn.TransformerDecoderLayer(D, N, FF, activation=tanh_gelu)),
    ]
    for convert, module in cases:
        with pytest.raises(ValueError, match="activation .* is not supported"):
            convert(module)


def test_wrong_module_types_raise():
    layer = nn.TransformerEncoderLayer(D, N, FF)
    with pytest.raises(TypeError, match="TransformerDecoderLayer, got TransformerEncoderLayer"):
        interop.from_torch_decoder_layer(layer)
    with pytest.raises(TypeError, match="TransformerEncoder, got TransformerEncoderLayer"):
        interop.from_torch_encoder(layer)
    with pytest.raises(TypeError, match="got TransformerEncoderLayer"):
        interop.config_from_torch(layer)
    with pytest.raises(TypeError, match="LayerNorm, got RMSNorm"):
        interop.from_torch_encoder(nn.TransformerEncoder(layer, 1, norm=nn.RMSNorm(D),
                                                         enable_nested_tensor=False))


def test_mismatched_settings_raise():
    model = nn.Transformer(D, N, 1, 1, FF)
    model.decoder.layers[0].norm_first = True
    with pytest.raises(ValueError, match="encoder and decoder differ in .*norm_position"):
        interop.from_torch_transformer(model)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, N, FF), 2, enable_nested_tensor=False)
    enc.layers[1].norm2.eps = 1e-3
    with pytest.raises(ValueError, match="different eps"):
        interop.from_torch_encoder(enc)
