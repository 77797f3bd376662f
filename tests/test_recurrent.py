"""The recurrent baseline (jformer.recurrent): torch parity of the cells and layers, padding,
additive attention, the Bahdanau encoder-decoder (causality, decoding, training) and bad input.

Functions are jitted once per configuration (module-level ``jax.jit``): a scan compiled per
eager call would dominate the run time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from torch import nn

from jformer import interop, training
from jformer.blocks import Context
from jformer.recurrent import (
    RNNConfig,
    additive_attention,
    init_additive_attention,
    init_rnn_seq2seq,
    rnn_greedy_decode,
    rnn_layer,
    rnn_seq2seq_apply,
)

B, T, D_IN, H, L = 3, 6, 5, 7, 2
LENGTHS = [6, 3, 1]
TOL = 1e-5

apply = jax.jit(rnn_seq2seq_apply, static_argnames=("cfg", "return_attention"))
greedy = jax.jit(rnn_greedy_decode, static_argnames=("cfg", "max_len", "bos_id", "eos_id"))
init = jax.jit(init_rnn_seq2seq, static_argnums=1)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


# ------------------------------------------------------------ layer vs torch


def _torch_state(cfg: RNNConfig, carries: dict) -> list:
    """torch's (h_0, c_0) [L·dirs, B, H] as ``rnn_layer``'s state [{"forward", "backward"}] * L."""
    n = len(cfg.directions)
    return [{d: {k: jnp.asarray(_np(v[l * n + i])) for k, v in carries.items()}
             for i, d in enumerate(cfg.directions)} for l in range(cfg.num_layers)]


@pytest.mark.parametrize("module_type, layers, bidirectional, bias", [
    (nn.LSTM, L, True, True), (nn.GRU, L, True, True), (nn.GRU, 1, False, False)])
def test_rnn_layer_matches_torch_with_and_without_padding(module_type, layers, bidirectional, bias,
                                                          no_rank_promotion):
    """Outputs and final states of a batch_first torch LSTM / GRU with imported weights, from a
    random initial state; padded: torch's packed sequences, whose padded outputs are zeros and
    whose final states (both directions) are each row's own."""
    torch.manual_seed(0)
    module = module_type(D_IN, H, num_layers=layers, bidirectional=bidirectional, bias=bias,
                         batch_first=True).eval()
    cfg, params = interop.from_torch_rnn(module)
    is_lstm, dirs = module_type is nn.LSTM, len(cfg.directions)
    assert (cfg.cell, cfg.d_embed, cfg.d_hidden, cfg.num_layers, dirs) == (
        "lstm" if is_lstm else "gru", D_IN, H, layers, 2 if bidirectional else 1)
    x = torch.randn(B, T, D_IN)
    h0 = {"h": torch.randn(dirs * layers, B, H)}
    if is_lstm:
        h0["c"] = torch.randn(dirs * layers, B, H)
    layer = jax.jit(lambda p, x, valid, s: rnn_layer(p, x, Context(cfg, valid=valid), state=s))
    torch_h0 = (h0["h"], h0["c"]) if is_lstm else h0["h"]
    for lengths in (None, LENGTHS):
        if lengths is None:
            out, hn = module(x, torch_h0)
            valid = jnp.ones((B, T), bool)
        else:
            packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths), batch_first=True,
                                                       enforce_sorted=False)
            out, hn = module(packed, torch_h0)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
            valid = jnp.arange(T)[None, :] < jnp.asarray(lengths)[:, None]
        hn = dict(zip(h0, hn if is_lstm else (hn,)))
        y, aux = layer(params, jnp.asarray(_np(x)), valid, _torch_state(cfg, h0))
        assert y.shape == (B, T, dirs * H)
        np.testing.assert_allclose(y, _np(out), atol=TOL, rtol=0)
        assert not np.asarray(y)[~np.asarray(valid)].any(), "outputs at padded steps must be zeros"
        expected = _torch_state(cfg, hn)
        for got, want in zip(jax.tree.leaves(aux["state"]), jax.tree.leaves(expected)):
            np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
        assert aux["attention"] is None and aux["cache"] is None


def test_padding_changes_nothing_of_a_row():
    """A row padded at the end (zeros or garbage beyond its length) gives the outputs and the
    final state of the same row run alone without padding; the padded outputs are zeros."""
    cfg = RNNConfig(cell="lstm", d_embed=D_IN, d_hidden=H, num_layers=L, bidirectional=True)
    _, params = interop.from_torch_rnn(nn.LSTM(D_IN, H, num_layers=L, bidirectional=True, batch_first=True))
    layer = jax.jit(lambda p, x, valid: rnn_layer(p, x, Context(cfg, valid=valid)))
    x = jax.random.normal(jax.random.key(0), (1, T, D_IN))
    n = 4
    y_pad, aux_pad = layer(params, x, jnp.arange(T)[None] < n)
    y, aux = layer(params, x[:, :n], jnp.ones((1, n), bool))
    np.testing.assert_allclose(y_pad[:, :n], y, atol=1e-6)
    np.testing.assert_array_equal(y_pad[:, n:], 0.0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), aux_pad["state"], aux["state"])


# ----------------------------------------------------------- additive attention


def test_additive_attention_matches_numpy_and_masked_rows_are_finite():
    Dq, Dk, A, S = 4, 6, 5, 7
    params = init_additive_attention(jax.random.key(1), Dq, Dk, A)
    params["query"]["bias"] = jax.random.normal(jax.random.key(2), (A,))  # a zero bias would hide a missing one
    kq, kk = jax.random.split(jax.random.key(3))
    q, k = jax.random.normal(kq, (B, Dq)), jax.random.normal(kk, (B, S, Dk))
    mask = jnp.asarray([[True] * S, [True, True, False, True, False, False, False], [False] * S])
    context, weights = jax.jit(additive_attention)(params, q, k, mask)

    p = jax.tree.map(np.asarray, params)
    query = np.asarray(q) @ p["query"]["kernel"] + p["query"]["bias"]
    energy = np.tanh(query[:, None] + np.asarray(k) @ p["key"]["kernel"])
    scores = (energy @ p["score"]["kernel"])[..., 0]
    for b in range(2):  # the rows with something to attend
        m = np.asarray(mask[b])
        e = np.exp(scores[b, m] - scores[b, m].max())
        want = np.zeros(S)
        want[m] = e / e.sum()
        np.testing.assert_allclose(weights[b], want, atol=1e-6)
        np.testing.assert_allclose(context[b], want @ np.asarray(k[b]), atol=1e-5)
    np.testing.assert_array_equal(weights[2], 0.0)  # fully masked: nothing, and no NaN
    np.testing.assert_array_equal(context[2], 0.0)
    grads = jax.jit(jax.grad(lambda q: additive_attention(params, q, k, mask)[0].sum()))(q)
    assert np.isfinite(grads).all() and not grads[2].any()


# ------------------------------------------------------------------ the model

CFG = RNNConfig(cell="lstm", vocab_size=12, src_vocab_size=10, d_embed=8, d_hidden=16, num_layers=2,
                dropout_rate=0.1, pad_id=0)
SRC = jnp.asarray([[3, 4, 5, 6, 7], [8, 9, 3, 0, 0]])
TGT_IN = jnp.asarray([[1, 3, 4, 5, 6, 7], [1, 8, 9, 10, 0, 0]])


@pytest.fixture(scope="module")
def params():
    return init(jax.random.key(0), CFG)


def _run(params, src=SRC, tgt_in=TGT_IN, *, tgt_mask=TGT_IN != 0):
    """``apply`` with explicit masks and weights: every call shares one compiled program."""
    return apply(params, src, tgt_in, cfg=CFG, src_mask=SRC != 0, tgt_mask=tgt_mask, return_attention=True)


def test_seq2seq_shapes_jit_matches_eager_and_attention_is_masked(params, no_rank_promotion):
    logits, aux = _run(params)
    assert logits.shape == (2, 6, CFG.vocab_size) and aux["attention"].shape == (2, 6, 5)
    assert aux["state"] == {} and aux["cache"] is None
    eager, eager_aux = rnn_seq2seq_apply(params, SRC, TGT_IN, cfg=CFG)  # padding from cfg.pad_id
    assert eager_aux["attention"] is None
    np.testing.assert_allclose(logits, eager, atol=1e-5)
    np.testing.assert_allclose(aux["attention"].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(aux["attention"][1, :, 3:], 0.0)  # source padding gets no weight
    # Whatever sits at masked source positions changes nothing.
    garbage = SRC.at[1, 3:].set(5)
    np.testing.assert_allclose(_run(params, garbage)[0], logits, atol=1e-6)
    # A masked target step leaves the decoder state as it was: what it holds changes no later step.
    skip = (TGT_IN != 0).at[0, 2].set(False)
    a, b = (_run(params, tgt_in=TGT_IN.at[0, 2].set(v), tgt_mask=skip)[0] for v in (9, 10))
    np.testing.assert_allclose(a[0, 3:], b[0, 3:], atol=1e-6)
    assert not np.allclose(a[0, 3:], logits[0, 3:], atol=1e-4)  # the skipped step did matter unmasked


def test_seq2seq_gradients_are_finite_and_causal(params):
    """Logits at target step t depend on the target inputs up to t only: the rows of the target
    embedding table holding later inputs get zero gradient (row 0's inputs are all distinct).
    With dropout on (a key), as in training."""

    @jax.jit
    def grad_at(params, t, key):
        return jax.value_and_grad(lambda p: apply(p, SRC, TGT_IN, cfg=CFG, key=key)[0][0, t].sum())(params)

    for t in (0, 2, 5):
        value, g = grad_at(params, t, jax.random.key(t))
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(g))
        table = np.asarray(g["tgt_embed"]["embedding"])
        seen, later = TGT_IN[0, : t + 1], TGT_IN[0, t + 1:]
        assert all(np.abs(table[i]).sum() > 0 for i in seen), f"step {t} must read inputs <= {t}"
        assert not table[np.asarray(later)].any(), f"step {t} must not read inputs after {t}"
        assert np.abs(g["src_embed"]["embedding"][SRC[0]]).sum() > 0  # the decoder reads the source
        assert not np.asarray(g["src_embed"]["embedding"])[np.asarray(SRC[1, :2])].any()  # not another row's
    # At the last step every parameter tensor takes part; dropout changed the logits.
    assert all(np.abs(leaf).sum() > 0 for leaf in jax.tree.leaves(g))
    plain = _run(params)[0]
    assert not np.isclose(value, plain[0, 5].sum())


# ------------------------------------------------------------ training, decoding

COPY = RNNConfig(cell="gru", vocab_size=10, d_embed=16, d_hidden=32, num_layers=1, dropout_rate=0.0, pad_id=0)
BOS, EOS = 1, 2


def _copy_batch(key, batch_size=32, max_len=6):
    """Copy task: src = symbols 3..9 (lengths 2..6, padded), tgt_out = src + EOS, tgt_in = BOS + src."""
    k_len, k_sym = jax.random.split(key)
    lengths = np.asarray(jax.random.randint(k_len, (batch_size,), 2, max_len + 1))
    symbols = np.asarray(jax.random.randint(k_sym, (batch_size, max_len), 3, 10))
    src = np.where(np.arange(max_len) < lengths[:, None], symbols, 0)
    tgt_out = np.zeros((batch_size, max_len + 1), np.int32)
    tgt_out[:, :max_len] = src
    tgt_out[np.arange(batch_size), lengths] = EOS
    tgt_in = np.concatenate([np.full((batch_size, 1), BOS), tgt_out[:, :-1]], 1)
    tgt_in[tgt_in == EOS] = 0
    return {"src": jnp.asarray(src), "tgt_in": jnp.asarray(tgt_in), "tgt_out": jnp.asarray(tgt_out)}


@pytest.fixture(scope="module")
def trained():
    """A GRU model after 60 Adam steps on one copy batch, and its losses."""
    batch = _copy_batch(jax.random.key(0))
    loss_fn = functools.partial(training.seq2seq_loss, cfg=COPY, apply_fn=rnn_seq2seq_apply)
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, {}, batch, None)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    params = init(jax.random.key(1), COPY)
    opt_state, losses = tx.init(params), []
    for _ in range(60):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    return params, batch, losses


def test_seq2seq_loss_trains_the_copy_task(trained):
    _, _, losses = trained
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.3 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_greedy_decode_is_the_argmax_of_teacher_forcing(trained):
    params, batch, _ = trained
    src = batch["src"][:8]
    tokens = greedy(params, src, cfg=COPY, max_len=8, bos_id=BOS, eos_id=EOS)
    assert tokens.shape == (8, 8) and tokens.dtype == jnp.int32
    tgt_in = jnp.concatenate([jnp.full((8, 1), BOS), tokens[:, :-1]], 1)
    predicted = np.asarray(jnp.argmax(apply(params, src, tgt_in, cfg=COPY)[0], -1))
    tokens = np.asarray(tokens)
    ended = 0
    for row, pred in zip(tokens, predicted):
        stop = int(np.argmax(row == EOS)) + 1 if (row == EOS).any() else len(row)
        ended += stop < len(row) or row[-1] == EOS
        np.testing.assert_array_equal(row[:stop], pred[:stop])
        np.testing.assert_array_equal(row[stop:], COPY.pad_id)  # after EOS: padding
    assert ended >= 4, "the trained model should end most rows with EOS"


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("field, value", [("cell", "rnn"), ("d_hidden", 0), ("num_layers", -1),
                                          ("bidirectional", "yes"), ("dropout_rate", 1.0), ("pad_id", -1),
                                          ("src_vocab_size", 0)])
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"RNNConfig.{field}"):
        RNNConfig(**{field: value})


def test_config_is_static_and_has_no_norm():
    assert hash(CFG) == hash(CFG.replace()) and CFG.norm == "none" and CFG.source_vocab_size == 10
    with pytest.raises(ValueError, match="unknown RNNConfig options"):
        CFG.replace(hidden=3)


def test_bad_inputs_raise_naming_the_argument(params):
    with pytest.raises(ValueError, match="src holds id 10"):
        rnn_seq2seq_apply(params, SRC.at[0, 1].set(10), TGT_IN, cfg=CFG)
    with pytest.raises(ValueError, match="tgt_in must be integer"):
        rnn_seq2seq_apply(params, SRC, TGT_IN.astype(jnp.float32), cfg=CFG)
    with pytest.raises(ValueError, match="src_mask"):
        rnn_seq2seq_apply(params, SRC, TGT_IN, cfg=CFG, src_mask=jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="bos_id=12"):
        rnn_greedy_decode(params, SRC, cfg=CFG, max_len=3, bos_id=12, eos_id=2)
    with pytest.raises(ValueError, match="max_len"):
        rnn_greedy_decode(params, SRC, cfg=CFG, max_len=0, bos_id=1, eos_id=2)
    with pytest.raises(ValueError, match="cache"):
        rnn_layer(params["encoder"], jnp.ones((1, 2, 8)), Context(CFG), cache={})
    with pytest.raises(ValueError, match="mask"):
        additive_attention(params["attention"], jnp.ones((2, 16)), jnp.ones((2, 5, 32)), jnp.ones((2, 5)))
    with pytest.raises(TypeError, match="torch.nn.LSTM or GRU"):
        interop.from_torch_rnn(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="proj_size"):
        interop.from_torch_rnn(nn.LSTM(4, 6, proj_size=3))


def test_out_of_range_ids_under_jit_give_nan_not_a_plausible_answer(params, trained):
    bad = SRC.at[0, 1].set(10)  # traced: cannot raise, so the row turns NaN
    logits = _run(params, bad)[0]
    assert np.isnan(logits[0]).all() and np.isfinite(logits[1]).all()
    copy_params, batch, _ = trained
    tokens = greedy(copy_params, batch["src"][:8].at[0, 0].set(10), cfg=COPY, max_len=8, bos_id=BOS, eos_id=EOS)
    assert (tokens[0] == -1).all() and (tokens[1:] >= 0).all()
