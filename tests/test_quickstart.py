"""Quickstart end-to-end (CI setting) and unit tests of jformer.training and jformer.decoding."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jformer
from experiments.quickstart import BOS, EOS, PAD, make_batch
from jformer.decoding import greedy_decode_seq2seq
from jformer.training import cross_entropy, token_accuracy

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ training


def _np_cross_entropy(logits, targets, weights, eps):
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    V = logits.shape[-1]
    q = (1 - eps) * np.eye(V)[targets] + eps / V
    per_token = -(q * logp).sum(-1)
    return (per_token * weights).sum() / weights.sum(), weights.sum()


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_matches_numpy(eps):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, size=(2, 5))
    weights = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], np.float32)
    loss, total = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), weights=jnp.asarray(weights),
                                label_smoothing=eps)
    want, want_total = _np_cross_entropy(logits, targets, weights, eps)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(total) == want_total == 7


def test_cross_entropy_padding_is_ignored_and_defaults():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(3, 4, 6)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 6, size=(3, 4)))
    w = jnp.asarray([[1, 1, 0, 0]] * 3, jnp.float32)
    loss, _ = cross_entropy(logits, targets, weights=w)
    # Changing logits/targets at padded positions changes nothing.
    loss2, _ = cross_entropy(logits.at[:, 2:].set(100.0), targets.at[:, 2:].set(0), weights=w)
    np.testing.assert_allclose(float(loss), float(loss2), rtol=1e-6)
    # No weights: plain mean of -log p(target).
    full, total = cross_entropy(logits, targets)
    logp = jax.nn.log_softmax(logits)
    want = -jnp.take_along_axis(logp, targets[..., None], -1).mean()
    np.testing.assert_allclose(float(full), float(want), rtol=1e-6)
    assert float(total) == 12
    # bfloat16 logits are scored in float32; all-zero weights give 0, not NaN.
    bf, _ = cross_entropy(logits.astype(jnp.bfloat16), targets, weights=w)
    assert bf.dtype == jnp.float32
    zero, _ = cross_entropy(logits, targets, weights=jnp.zeros_like(w))
    assert float(zero) == 0.0


def test_token_accuracy_known_value():
    targets = jnp.asarray([[1, 2, 0, 3], [2, 2, 1, 0]])
    preds = jnp.asarray([[1, 0, 0, 3], [2, 1, 1, 2]])
    logits = jax.nn.one_hot(preds, 4)
    weights = jnp.asarray([[1, 1, 0, 1], [1, 1, 1, 0]])
    # weighted positions: row 0 -> correct, wrong, correct; row 1 -> correct, wrong, correct
    np.testing.assert_allclose(float(token_accuracy(logits, targets, weights)), 4 / 6, rtol=1e-6)
    np.testing.assert_allclose(float(token_accuracy(logits, targets)), 5 / 8, rtol=1e-6)


def test_token_accuracy_equals_argmax_and_counts_a_tied_top_as_a_hit():
    logits = jax.random.normal(jax.random.key(0), (3, 50, 97))
    targets = jax.random.randint(jax.random.key(1), (3, 50), 0, 97).at[:, ::3].set(jnp.argmax(logits, -1)[:, ::3])
    expected = np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(targets))
    np.testing.assert_allclose(float(token_accuracy(logits, targets)), expected, rtol=1e-6)
    assert float(token_accuracy(jnp.zeros((2, 5, 7)), targets[:2, :5] % 7)) == 1.0


# ------------------------------------------------------------------ decoding


@pytest.fixture(scope="module")
def small_model():
    cfg = jformer.TransformerConfig(vocab_size=11, d_model=32, num_heads=4, num_layers=2, d_ff=64,
                                    dropout_rate=0.0, max_len=16, pad_id=0)
    init = jax.jit(jformer.init_seq2seq, static_argnums=1,
                   compiler_options={"xla_backend_optimization_level": 0})  # fast compile
    params = init(jax.random.key(0), cfg)
    src = jnp.asarray(np.random.default_rng(0).integers(3, 11, size=(4, 7)))
    src = src.at[1, 5:].set(0).at[3, 3:].set(0)  # padded sources
    return cfg, params, src


def _reference_greedy(params, src, cfg, bos_id, eos_id, max_len):
    """Step-by-step greedy decoding, recomputing seq2seq_apply on the growing prefix."""
    apply = jax.jit(jformer.seq2seq_apply, static_argnames="cfg",
                    compiler_options={"xla_backend_optimization_level": 0})
    B = src.shape[0]
    out = np.full((B, max_len), cfg.pad_id, np.int32)
    done = np.zeros(B, bool)
    for t in range(max_len):
        tgt_in = jnp.concatenate([jnp.full((B, 1), bos_id), jnp.asarray(out[:, :t])], axis=1)
        logits, _ = apply(params, src, tgt_in, cfg=cfg)
        nxt = np.where(done, cfg.pad_id, np.asarray(jnp.argmax(logits[:, -1], -1)))
        out[:, t] = nxt
        done |= nxt == eos_id
    return out


def test_greedy_decode_matches_stepwise_argmax(small_model):
    cfg, params, src = small_model
    got = greedy_decode_seq2seq(params, src, cfg=cfg, bos_id=1, eos_id=None, max_len=6)  # never stops
    assert got.shape == (4, 6) and got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), _reference_greedy(params, src, cfg, 1, -1, 6))


def test_greedy_decode_pads_after_eos(small_model):
    cfg, params, src = small_model
    raw = np.asarray(greedy_decode_seq2seq(params, src, cfg=cfg, bos_id=1, eos_id=None, max_len=6))
    # Choose as EOS a token that some row b first emits at a step t >= 1 (not padding).
    b, t = next((b, t) for b in range(len(raw)) for t in range(1, 6)
                if raw[b, t] != cfg.pad_id and raw[b, t] not in raw[b, :t])
    eos = int(raw[b, t])
    got = np.asarray(greedy_decode_seq2seq(params, src, cfg=cfg, bos_id=1, eos_id=eos, max_len=6))
    np.testing.assert_array_equal(got[b, :t + 1], raw[b, :t + 1])
    assert (got[b, t + 1:] == cfg.pad_id).all()
    for row in got:  # every row: nothing but padding after its first EOS
        hits = np.flatnonzero(row == eos)
        if hits.size:
            assert (row[hits[0] + 1:] == cfg.pad_id).all()
    np.testing.assert_array_equal(got, _reference_greedy(params, src, cfg, 1, eos, 6))


# ------------------------------------------------------------------ quickstart


def test_make_batch_is_reversal():
    src, tgt_in, tgt_out = make_batch(np.random.default_rng(0), 8, 2, 6, 10)
    assert src.shape == (8, 6) and tgt_in.shape == tgt_out.shape == (8, 7)
    for s, i, o in zip(src, tgt_in, tgt_out):
        seq = [int(x) for x in s if x != PAD]
        assert [int(x) for x in o if x != PAD] == seq[::-1] + [EOS]
        assert [int(x) for x in i if x != PAD] == [BOS] + seq[::-1]


@pytest.mark.slow
def test_quickstart_ci_setting():
    proc = subprocess.run([sys.executable, "-m", "experiments.quickstart", "--steps", "400"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "held-out greedy token accuracy" in proc.stdout
