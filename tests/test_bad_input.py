"""Bad input never gives a plausible, finite, wrong answer (models, attention, decoding, losses).

Outside ``jit``, where values are concrete, a bad id, size, shape or cache position is a
ValueError that names it; inside ``jit`` it turns into NaN (or token -1), never into a
finite result. Masked positions never contribute, and a row with nothing to attend to
never falls back to keys its mask forbids. Files (checkpoints, tokenizers) are covered
in test_bad_input_io.py, the experiment CLI in test_bad_input_cli.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jformer as jf
from jformer import decoding, models, training

IMPLS = [None, "xla", "blockwise"]
V = 20


def tiny(**overrides):
    base = dict(vocab_size=V, d_model=16, num_heads=2, num_layers=2, d_ff=32, dropout_rate=0.0,
                max_len=16, pad_id=0, norm_position="pre")
    return jf.TransformerConfig(**{**base, **overrides})


# ------------------------------------------------------------- causality and padding


def test_issue_reproduction_left_padding_does_not_leak_the_future():
    """The reported case: only positions 3-4 change, so logits at 0-2 must not move."""
    for impl in IMPLS:
        cfg, exe = tiny(max_len=8, norm_position="post"), jf.ExecConfig(attention_impl=impl)
        params = jf.init_lm(jax.random.key(0), cfg)
        a, _ = jf.lm_apply(params, jnp.array([[0, 0, 5, 6, 7]]), cfg=cfg, exe=exe)
        b, _ = jf.lm_apply(params, jnp.array([[0, 0, 5, 9, 3]]), cfg=cfg, exe=exe)
        np.testing.assert_array_equal(np.asarray(a[:, :3]), np.asarray(b[:, :3]), err_msg=str(impl))
        assert float(jnp.abs(a[:, 3:] - b[:, 3:]).max()) > 1e-3  # the test can see a difference


ROWS = {
    "left padding": [[0, 0, 0, 5, 6, 7, 8, 9]],
    "right padding": [[5, 6, 7, 8, 0, 0, 0, 0]],
    "packed rows": [[5, 6, 0, 7, 8, 9, 0, 4]],  # several sequences in one row, pads between
}


def _future_gradient(jac):
    """max |d out_t / d position_s| over s > t, for jac [T, max_len, D]."""
    T = jac.shape[0]
    future = np.triu(np.ones((T, jac.shape[1]), bool), k=1)
    return float(np.abs(np.asarray(jac))[future].max())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows", list(ROWS))
def test_lm_causality_by_gradient_with_padding(impl, rows):
    """d logits_t / d (position embedding of s) = 0 for every s > t: learned positions give each
    position its own input, so the gradient tells whether t reads s, padded or not."""
    cfg, exe = tiny(positions="learned", max_len=8), jf.ExecConfig(attention_impl=impl)
    params = jf.init_lm(jax.random.key(1), cfg)
    tokens = jnp.array(ROWS[rows])

    def out(pos_table):
        p = {**params, "embed": {**params["embed"], "position": {"embedding": pos_table}}}
        return jf.lm_apply(p, tokens, cfg=cfg, exe=exe)[0][0].sum(-1)  # [T]

    jac = jax.jit(jax.jacrev(out))(params["embed"]["position"]["embedding"])
    assert _future_gradient(jac) == 0.0
    assert float(jnp.abs(jac).max()) > 0  # the present and past do reach the output


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows", list(ROWS))
def test_seq2seq_decoder_causality_by_gradient_with_padding(impl, rows):
    cfg, exe = tiny(positions="learned", max_len=8), jf.ExecConfig(attention_impl=impl)
    params = jf.init_seq2seq(jax.random.key(2), cfg)
    src, tgt = jnp.array([[4, 5, 6, 0]]), jnp.array(ROWS[rows])

    def out(pos_table):
        p = {**params, "tgt_embed": {**params["tgt_embed"], "position": {"embedding": pos_table}}}
        return jf.seq2seq_apply(p, src, tgt, cfg=cfg, exe=exe)[0][0].sum(-1)

    jac = jax.jit(jax.jacrev(out))(params["tgt_embed"]["position"]["embedding"])
    assert _future_gradient(jac) == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_a_row_with_no_allowed_key_is_zero_for_every_implementation(impl):
    q = jax.random.normal(jax.random.key(0), (2, 5, 2, 4))
    mask = jnp.ones((2, 1, 5, 5), bool).at[0, :, 1].set(False).at[1].set(False)
    out, _ = jf.attend(q, q, q, mask=mask, implementation=impl)
    np.testing.assert_array_equal(np.asarray(out[0, 1]), 0.0)
    np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
    ref, _ = jf.attend(q, q, q, mask=mask)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    grads = jax.grad(lambda q: jf.attend(q, q, q, mask=mask, is_causal=True, implementation=impl)[0].sum())(q)
    assert bool(jnp.isfinite(grads).all())


def test_empty_rows_return_zero_weights():
    q = jax.random.normal(jax.random.key(0), (3, 4))
    mask = jnp.ones((3, 3), bool).at[1].set(False)
    out, w = jf.scaled_dot_product_attention(q, q, q, mask=mask, return_weights=True)
    np.testing.assert_array_equal(np.asarray(w[1]), 0.0)
    np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
    np.testing.assert_allclose(np.asarray(w)[[0, 2]].sum(-1), 1.0, rtol=1e-6)


# ------------------------------------------------------------ garbage at masked keys


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("garbage", [jnp.nan, jnp.inf, -jnp.inf, 1e30])
def test_masked_keys_and_values_never_contribute(impl, garbage):
    """Garbage (NaN, inf, huge) in the keys and values of masked positions changes nothing."""
    q = jax.random.normal(jax.random.key(0), (2, 4, 2, 8))
    kv = jax.random.normal(jax.random.key(1), (2, 6, 2, 8))
    mask = jnp.ones((2, 1, 1, 6), bool).at[:, :, :, 4:].set(False)  # keys 4, 5 are padding
    clean, _ = jf.attend(q, kv, kv, mask=mask, implementation=impl)
    dirty_kv = kv.at[:, 4:].set(garbage)
    out, _ = jf.attend(q, dirty_kv, dirty_kv, mask=mask, implementation=impl)
    assert bool(jnp.isfinite(out).all())
    np.testing.assert_allclose(out, clean, atol=1e-6)
    one = jf.scaled_dot_product_attention(q[:, :, 0], dirty_kv[:, :, 0], dirty_kv[:, :, 0], mask=mask[:, 0])
    np.testing.assert_allclose(one, clean[:, :, 0], atol=1e-6)


def test_masked_key_garbage_matches_jax_nn():
    """jax.nn.dot_product_attention keeps rows finite when a masked key is NaN; so does jformer."""
    q = jax.random.normal(jax.random.key(0), (1, 3, 1, 4))
    k = jax.random.normal(jax.random.key(1), (1, 5, 1, 4)).at[:, 3].set(jnp.nan)
    v = jax.random.normal(jax.random.key(2), (1, 5, 1, 4))
    mask = jnp.ones((1, 1, 3, 5), bool).at[..., 3].set(False)
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(jf.attend(q, k, v, mask=mask)[0], ref, atol=1e-6)


# ------------------------------------------------------------------ ids out of range


@pytest.mark.parametrize("bad", [-1, V, 99])
def test_token_ids_out_of_range_raise_with_id_position_and_vocabulary(bad):
    cfg = tiny()
    lm = jf.init_lm(jax.random.key(0), cfg)
    s2s = jf.init_seq2seq(jax.random.key(0), cfg)
    clf_cfg = cfg.replace(num_classes=3)
    clf = jf.init_classifier(jax.random.key(0), clf_cfg)
    good, wrong = jnp.array([[1, 2, 3]]), jnp.array([[1, bad, 3]])
    calls = {
        "tokens": lambda: jf.lm_apply(lm, wrong, cfg=cfg),
        "src": lambda: jf.seq2seq_apply(s2s, wrong, good, cfg=cfg),
        "tgt_in": lambda: jf.seq2seq_apply(s2s, good, wrong, cfg=cfg),
        "tokens ": lambda: jf.classifier_apply(clf, wrong, cfg=clf_cfg),
        "targets": lambda: training.cross_entropy(jnp.zeros((1, 3, V)), wrong),
        "prompt": lambda: decoding.generate_lm(lm, wrong, cfg=cfg, max_new_tokens=2),
        "src ": lambda: decoding.greedy_decode_seq2seq(s2s, wrong, cfg=cfg, bos_id=1, eos_id=2, max_len=3),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"{name.strip()} holds id {bad} at position \[0, 1\].*\[0, {V}\)"):
            call()


def test_special_ids_out_of_range_raise():
    cfg = tiny()
    s2s = jf.init_seq2seq(jax.random.key(0), cfg)
    src = jnp.array([[1, 2, 3]])
    with pytest.raises(ValueError, match="bos_id=50"):
        decoding.greedy_decode_seq2seq(s2s, src, cfg=cfg, bos_id=50, eos_id=2, max_len=3)
    with pytest.raises(ValueError, match="eos_id=-1"):
        decoding.beam_search_seq2seq(s2s, src, cfg=cfg, bos_id=1, eos_id=-1, max_len=3)
    with pytest.raises(ValueError, match="eos_id=20"):
        decoding.generate_lm(jf.init_lm(jax.random.key(0), cfg), src, cfg=cfg, max_new_tokens=2, eos_id=20)


def test_ids_out_of_range_under_jit_are_nan_never_a_wrapped_lookup():
    cfg = tiny()
    lm = jf.init_lm(jax.random.key(0), cfg)
    logits = jax.jit(lambda t: jf.lm_apply(lm, t, cfg=cfg)[0])(jnp.array([[3, -1, 4], [3, 4, 5]]))
    assert bool(jnp.isnan(logits[0, 1:]).all())       # the bad position and every one that reads it
    assert bool(jnp.isfinite(logits[1]).all())        # another row is untouched
    loss = jax.jit(lambda t: training.cross_entropy(jnp.zeros((1, 2, V)), t)[0])(jnp.array([[1, -1]]))
    assert bool(jnp.isnan(loss))
    acc = jax.jit(lambda t: training.token_accuracy(jnp.zeros((1, 2, V)), t))(jnp.array([[1, V]]))
    assert bool(jnp.isnan(acc))


def test_decoding_inside_a_callers_jit_emits_minus_one_for_a_bad_prompt():
    cfg = tiny()
    lm = jf.init_lm(jax.random.key(0), cfg)
    out = jax.jit(lambda p: decoding.generate_lm(lm, p, cfg=cfg, max_new_tokens=3))(jnp.array([[1, 99], [1, 2]]))
    np.testing.assert_array_equal(np.asarray(out[0, 2:]), -1)
    assert bool((out[1, 2:] >= 0).all())
    s2s = jf.init_seq2seq(jax.random.key(0), cfg)
    toks, scores = jax.jit(lambda s: decoding.beam_search_seq2seq(s2s, s, cfg=cfg, bos_id=1, eos_id=2, max_len=3,
                                                                  beam_size=2))(jnp.array([[1, -3], [1, 3]]))
    np.testing.assert_array_equal(np.asarray(toks[0]), -1)
    assert bool(jnp.isnan(scores[0])) and bool(jnp.isfinite(scores[1]))


# ------------------------------------------------------------------------ KV cache


def test_kv_cache_overflow_raises_eagerly_and_is_nan_under_jit():
    cfg = tiny()
    lm = jf.init_lm(jax.random.key(0), cfg)
    cache = decoding.init_lm_cache(lm, cfg, 1, 4)
    _, aux = jf.lm_apply(lm, jnp.array([[1, 2, 3]]), cfg=cfg, cache=cache)
    with pytest.raises(ValueError, match=r"cache overflow: 3 cached positions \+ 2 new tokens .*max_len=4"):
        jf.lm_apply(lm, jnp.array([[4, 5]]), cfg=cfg, cache=aux["cache"])
    step = jax.jit(lambda t, c: jf.lm_apply(lm, t, cfg=cfg, cache=c)[0])
    assert bool(jnp.isfinite(step(jnp.array([[4]]), aux["cache"])).all())  # the last slot fits
    assert bool(jnp.isnan(step(jnp.array([[4, 5]]), aux["cache"])).all())


def test_seq2seq_cache_overflow_raises():
    cfg = tiny()
    params = jf.init_seq2seq(jax.random.key(0), cfg)
    src = jnp.array([[3, 4, 5]])
    memory, _ = models.seq2seq_encode(params, src, cfg=cfg)
    cache = decoding.init_seq2seq_cache(params, memory, src, cfg=cfg, max_len=2)
    with pytest.raises(ValueError, match="cache overflow"):
        models.seq2seq_decode(params, None, None, jnp.array([[1, 4, 5]]), cfg=cfg, cache=cache)


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("field,value", [
    ("num_heads", 0), ("num_kv_heads", 0), ("d_model", -16), ("num_layers", -1), ("num_layers", 0),
    ("num_decoder_layers", -2), ("vocab_size", 0), ("vocab_size", -5), ("src_vocab_size", 0), ("d_ff", -1),
    ("max_len", 0), ("num_classes", 0), ("d_model", 16.0), ("num_layers", True),
])
def test_config_sizes_must_be_positive_integers(field, value):
    with pytest.raises(ValueError, match=rf"TransformerConfig\.{field} must be an integer >= 1, got {value!r}"):
        tiny(**{field: value})


@pytest.mark.parametrize("field,value,message", [
    ("norm_eps", -1.0, "norm_eps must be > 0"), ("norm_eps", 0.0, "norm_eps must be > 0"),
    ("norm_eps", float("nan"), "norm_eps must be > 0"), ("rope_base", 0.0, "rope_base must be > 0"),
    ("batch_norm_momentum", 1.0, "batch_norm_momentum must be in"), ("pad_id", 20, "pad_id must be None or an id"),
    ("pad_id", -1, "pad_id must be None or an id"), ("dropout_rate", 1.0, "dropout_rate must be in"),
])
def test_config_values_out_of_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny(**{field: value})


def test_rope_needs_an_even_head_width():
    with pytest.raises(ValueError, match="head width .* = 3 must be even"):
        tiny(d_model=6, num_heads=2, positions="rope")


@pytest.mark.parametrize("kwargs", [dict(num_heads=0), dict(num_heads=-2), dict(num_kv_heads=0),
                                    dict(head_dim=0), dict(kv_features=-1), dict(out_features=0)])
def test_init_multi_head_attention_sizes(kwargs):
    args = {"num_heads": 2, **kwargs}
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"{name} must be an integer >= 1"):
        jf.init_multi_head_attention(jax.random.key(0), 16, **args)
    with pytest.raises(ValueError, match="d_model must be an integer >= 1"):
        jf.init_multi_head_attention(jax.random.key(0), 0, 2)


# -------------------------------------------------------------------------- shapes


def test_attention_shape_errors_name_the_arrays_and_their_shapes():
    with pytest.raises(ValueError, match=r"q \(2, 4, 8\), k \(3, 5, 8\) and v \(3, 5, 8\) do not broadcast"):
        jf.scaled_dot_product_attention(jnp.ones((2, 4, 8)), jnp.ones((3, 5, 8)), jnp.ones((3, 5, 8)))
    with pytest.raises(ValueError, match=r"q must be \[\.\.\., T, H\] \(at least 2-D\), got shape \(8,\)"):
        jf.scaled_dot_product_attention(jnp.ones((8,)), jnp.ones((5, 8)), jnp.ones((5, 8)))
    with pytest.raises(ValueError, match=r"k must be \[\.\.\., S, K, H\] \(at least 3-D\), got shape \(5, 8\)"):
        jf.attend(jnp.ones((4, 2, 8)), jnp.ones((5, 8)), jnp.ones((5, 8)))
    with pytest.raises(ValueError, match=r"mask of shape \(3, 3\) is not broadcastable"):
        jf.scaled_dot_product_attention(jnp.ones((4, 8)), jnp.ones((5, 8)), jnp.ones((5, 8)),
                                        mask=jnp.ones((3, 3), bool))
    with pytest.raises(TypeError, match="mask must be boolean"):
        jf.scaled_dot_product_attention(jnp.ones((4, 8)), jnp.ones((5, 8)), jnp.ones((5, 8)),
                                        mask=jnp.ones((4, 5)))


def test_token_arrays_must_be_integer_matrices():
    cfg = tiny()
    lm = jf.init_lm(jax.random.key(0), cfg)
    with pytest.raises(ValueError, match=r"tokens must be integer token ids \[B, T\], got shape \(3,\)"):
        jf.lm_apply(lm, jnp.array([1, 2, 3]), cfg=cfg)
    with pytest.raises(ValueError, match="dtype float32"):
        jf.lm_apply(lm, jnp.ones((1, 3)), cfg=cfg)


def test_positions_and_lengths_out_of_range():
    table = jf.positional.init_learned_positions(jax.random.key(0), 8, 4)
    with pytest.raises(ValueError, match=r"positions holds id 8 at position \[2\].*\[0, 8\)"):
        jf.positional.learned_positions(table, jnp.array([6, 7, 8]))
    assert bool(jnp.isnan(jax.jit(jf.positional.learned_positions)(table, jnp.array([7, 8]))[1]).all())
    with pytest.raises(ValueError, match=r"lengths \[9\] are outside \[0, S=5\]"):
        jf.padding_mask(jnp.array([3, 9]), 5)
    with pytest.raises(ValueError, match=r"lengths \[-1\]"):
        jf.padding_mask(jnp.array([-1, 2]), 5)
