"""Attention: parity with jax.nn and Flax, invariants, masks, dtypes and errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jformer as jf
from tests.references import einsum_attention

B, T, S, D, N, H = 2, 5, 7, 32, 4, 8


def rand(key, *shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape, dtype)


def random_mask(key, shape, p=0.7):
    m = jax.random.bernoulli(jax.random.key(key), p, shape)
    return m.at[..., 0].set(True)  # every row sees at least one key


# ------------------------------------------------------------ single head


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sdpa_matches_jax_nn(is_causal, with_bias):
    q, k, v = rand(0, B, T, H), rand(1, B, T, H), rand(2, B, T, H)
    mask = random_mask(3, (B, T, T))
    bias = rand(4, B, T, T) if with_bias else None
    ours, weights = jf.scaled_dot_product_attention(q, k, v, mask=mask, bias=bias, is_causal=is_causal,
                                                    return_weights=True)
    ref = jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None],
                                       mask=mask[:, None], bias=None if bias is None else bias[:, None],
                                       is_causal=is_causal)[:, :, 0]
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    full = mask & jnp.tril(jnp.ones((T, T), bool)) if is_causal else mask
    assert float(jnp.abs(jnp.where(full, 0.0, weights)).max()) == 0.0


def test_sdpa_known_value():
    # One query, two keys, H = 4: q·k / √H = [0, 2 / 2] = [0, 1], so out = softmax([0, 1]) V.
    q = jnp.ones((1, 4)) / 2.0
    k = jnp.array([[0.0, 0, 0, 0], [1.0, 1, 1, 1]])
    v = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    out = jf.scaled_dot_product_attention(q, k, v)
    w = np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum()
    np.testing.assert_allclose(out, w[None], atol=1e-6)


def test_sdpa_any_leading_dims():
    q, k, v = rand(0, 3, 2, T, H), rand(1, 3, 2, S, H), rand(2, 3, 2, S, 6)
    out = jf.scaled_dot_product_attention(q, k, v)
    loop = jnp.stack([jnp.stack([jf.scaled_dot_product_attention(q[i, j], k[i, j], v[i, j])
                                 for j in range(2)]) for i in range(3)])
    assert out.shape == (3, 2, T, 6)
    np.testing.assert_allclose(out, loop, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_fully_masked_rows_are_finite(dtype):
    q, k, v = rand(0, B, T, H, dtype=dtype), rand(1, B, S, H, dtype=dtype), rand(2, B, S, H, dtype=dtype)
    mask = jnp.ones((B, T, S), bool).at[:, 1].set(False).at[1].set(False)
    out = jf.scaled_dot_product_attention(q, k, v, mask=mask)
    assert out.dtype == dtype and bool(jnp.isfinite(out).all())
    grads = jax.grad(lambda q: jf.scaled_dot_product_attention(q, k, v, mask=mask).astype(jnp.float32).sum())(q)
    assert bool(jnp.isfinite(grads).all())
    # And through multi-head attention with a padding mask that hides every key.
    params = jf.init_multi_head_attention(jax.random.key(3), D, N)
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    y, _ = jf.multi_head_attention(params, rand(4, B, T, D, dtype=dtype),
                                   mask=jf.padding_mask(jnp.array([0, 3]), T))
    assert bool(jnp.isfinite(y).all())


def test_attention_dropout_is_explicit_and_unbiased():
    q, k, v = rand(0, T, H), rand(1, S, H), rand(2, S, H)
    plain = jf.scaled_dot_product_attention(q, k, v)
    np.testing.assert_array_equal(plain, jf.scaled_dot_product_attention(q, k, v, dropout_rate=0.5))
    a = jf.scaled_dot_product_attention(q, k, v, dropout_rate=0.5, key=jax.random.key(1))
    b = jf.scaled_dot_product_attention(q, k, v, dropout_rate=0.5, key=jax.random.key(2))
    assert not np.allclose(a, plain) and not np.allclose(a, b)
    np.testing.assert_array_equal(a, jf.scaled_dot_product_attention(q, k, v, dropout_rate=0.5,
                                                                     key=jax.random.key(1)))
    many = jax.vmap(lambda kk: jf.scaled_dot_product_attention(q, k, v, dropout_rate=0.5, key=kk))(
        jax.random.split(jax.random.key(3), 4000))
    np.testing.assert_allclose(many.mean(0), plain, atol=0.1)


# -------------------------------------------------------------- multi-head


def flax_mha(num_heads, d_out):
    return nn.MultiHeadDotProductAttention(num_heads=num_heads, qkv_features=D, out_features=d_out)


@pytest.mark.parametrize("cross", [False, True])
def test_multi_head_matches_flax_linen(cross):
    xq = rand(0, B, T, D)
    xkv = rand(1, B, S, 24) if cross else None
    module = flax_mha(N, D)
    variables = module.init(jax.random.key(2), xq, xkv if cross else xq)
    mask = jnp.broadcast_to(random_mask(3, (B, 1, T, S if cross else T)), (B, N, T, S if cross else T))
    ref = module.apply(variables, xq, xkv if cross else xq, mask=mask)
    ours, aux = jf.multi_head_attention(variables["params"], xq, xkv, mask=mask)
    assert aux == {"attention": None, "cache": None}
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_multi_head_matches_jax_nn_with_bias_and_rope_layout():
    params = jf.init_multi_head_attention(jax.random.key(0), D, N)
    x = rand(1, B, T, D)
    mask = random_mask(2, (B, N, T, T))
    bias = jf.positional.alibi_bias(N, T)
    q, k, v = jf.project_qkv(params, x)
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask, bias=bias[None], is_causal=True)
    ours, _ = jf.attend(q, k, v, mask=mask, bias=bias, is_causal=True)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_vmap_path_equals_einsum_path():
    q, k, v = rand(0, B, T, N, H), rand(1, B, S, N, H), rand(2, B, S, N, H)
    mask = random_mask(3, (B, 1, T, S))
    ours, _ = jf.attend(q, k, v, mask=mask)
    np.testing.assert_allclose(ours, einsum_attention(q, k, v, mask=mask), atol=1e-5)
    ours, _ = jf.attend(q, k, v, is_causal=True)
    np.testing.assert_allclose(ours, einsum_attention(q, k, v, is_causal=True), atol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_grouped_query_equals_repeated_heads(num_kv_heads):
    q, k, v = rand(0, B, T, N, H), rand(1, B, S, num_kv_heads, H), rand(2, B, S, num_kv_heads, H)
    mask = random_mask(3, (B, N, T, S))
    bias = rand(4, N, T, S)
    G = N // num_kv_heads
    ours, w = jf.attend(q, k, v, mask=mask, bias=bias, return_weights=True)
    rep = lambda a: jnp.repeat(a, G, axis=2)  # noqa: E731  query head n reads kv head n // G
    ref = jax.nn.dot_product_attention(q, rep(k), rep(v), mask=mask, bias=bias[None])
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    fused, _ = jf.attend(q, k, v, mask=mask, bias=bias, implementation="xla")
    np.testing.assert_allclose(fused, ref, atol=1e-5)
    assert w.shape == (B, N, T, S)


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_fused_implementation_agrees_with_reference(num_kv_heads):
    params = jf.init_multi_head_attention(jax.random.key(0), D, N, num_kv_heads=num_kv_heads)
    x, kv = rand(1, B, T, D), rand(2, B, S, D)
    mask = jf.padding_mask(jnp.array([3, 7]), S)
    ref, _ = jf.multi_head_attention(params, x, kv, mask=mask)
    xla, _ = jf.multi_head_attention(params, x, kv, mask=mask, implementation="xla")
    np.testing.assert_allclose(xla, ref, atol=1e-5)
    # A single example without a batch axis also works on both paths.
    np.testing.assert_allclose(jf.multi_head_attention(params, x[0], is_causal=True, implementation="xla")[0],
                               jf.multi_head_attention(params, x[0], is_causal=True)[0], atol=1e-5)


@pytest.mark.parametrize("num_kv_heads,use_bias", [(None, True), (2, True), (1, False)])
def test_self_attention_projection_is_one_fused_matmul_with_the_same_values(num_kv_heads, use_bias):
    params = jf.init_multi_head_attention(jax.random.key(0), D, N, num_kv_heads=num_kv_heads,
                                          use_bias=use_bias)
    x = rand(1, B, T, D)
    q, k, v = jax.jit(jf.project_qkv)(params, x)
    for got, name in ((q, "query"), (k, "key"), (v, "value")):
        np.testing.assert_allclose(got, jf.layers.dense(params[name], x), atol=1e-5)
    hlo = jax.jit(jf.project_qkv).lower(params, x).as_text()
    assert hlo.count("dot_general") == 1  # cross-attention (x, kv) keeps three
    assert jax.jit(jf.project_qkv).lower(params, x, x + 1).as_text().count("dot_general") == 3


def test_weights_per_head_rows_sum_to_one_and_respect_mask():
    params = jf.init_multi_head_attention(jax.random.key(0), D, N)
    x = rand(1, B, T, D)
    lengths = jnp.array([5, 3])
    y, aux = jf.multi_head_attention(params, x, mask=jf.padding_mask(lengths, T), is_causal=True,
                                     return_weights=True)
    w = aux["attention"]
    assert y.shape == (B, T, D) and w.shape == (B, N, T, T)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    assert float(w[1, :, :, 3:].max()) == 0.0  # padded keys of example 1
    assert float(jnp.triu(w, 1).max()) == 0.0  # the future


def test_causality_by_gradient():
    """d out[t] / d x[s] = 0 for every s > t, through projections and rotary positions."""
    params = jf.init_multi_head_attention(jax.random.key(0), D, N)
    x = rand(1, T, D)
    jac = jax.jacrev(lambda x: jf.multi_head_attention(params, x, is_causal=True,
                                                       rope_positions=jnp.arange(T))[0])(x)  # [T, D, T, D]
    influence = jnp.abs(jac).sum((1, 3))  # [t, s]
    assert float(jnp.triu(influence, 1).max()) == 0.0
    assert float(influence[np.tril_indices(T)].min()) > 0.0


def test_vmap_over_batch_equals_loop_and_jit_equals_eager():
    params = jf.init_multi_head_attention(jax.random.key(0), D, N, num_kv_heads=2)
    x = rand(1, B, T, D)
    f = lambda p, x: jf.multi_head_attention(p, x, is_causal=True)[0]  # noqa: E731
    batched = jax.vmap(f, in_axes=(None, 0))(params, x)
    loop = jnp.stack([f(params, x[i]) for i in range(B)])
    np.testing.assert_allclose(batched, loop, atol=1e-6)
    np.testing.assert_allclose(jax.jit(f)(params, x), f(params, x), atol=1e-6)


def test_masks():
    np.testing.assert_array_equal(jf.causal_mask(3), np.tril(np.ones((3, 3), bool)))
    np.testing.assert_array_equal(jf.causal_mask(2, 4, offset=2),
                                  [[True, True, True, False], [True, True, True, True]])
    np.testing.assert_array_equal(jf.padding_mask(jnp.array([1, 3]), 3)[:, 0, 0],
                                  [[True, False, False], [True, True, True]])
    ids = jnp.array([[5, 0, 0], [7, 8, 0]])
    np.testing.assert_array_equal(jf.padding_mask_from_ids(ids, 0)[:, 0, 0], ids != 0)
    both = jf.combine_masks(jf.causal_mask(3), None, jf.padding_mask_from_ids(ids, 0))
    assert both.shape == (2, 1, 3, 3)
    np.testing.assert_array_equal(both[1, 0], np.tril(np.ones((3, 3), bool)) & np.array([1, 1, 0], bool))
    assert jf.combine_masks(None, None) is None


# -------------------------------------------------------------------- errors


def test_errors_name_the_argument_and_shapes():
    params = jf.init_multi_head_attention(jax.random.key(0), D, N)
    with pytest.raises(ValueError, match=r"inputs_q width 16 .*\(2, 5, 16\)"):
        jf.multi_head_attention(params, rand(0, B, T, 16))
    with pytest.raises(ValueError, match=r"inputs_kv width 8"):
        jf.multi_head_attention(params, rand(0, B, T, D), rand(1, B, S, 8))
    with pytest.raises(ValueError, match=r"mask of shape \(3, 1, 1, 5\) is not broadcastable .*\(2, 4, 5, 5\)"):
        jf.multi_head_attention(params, rand(0, B, T, D), mask=jnp.ones((3, 1, 1, T), bool))
    with pytest.raises(TypeError, match="mask must be boolean"):
        jf.multi_head_attention(params, rand(0, B, T, D), mask=jnp.ones((T, T)))
    with pytest.raises(ValueError, match="num_heads=3 does not divide d_model=32"):
        jf.init_multi_head_attention(jax.random.key(0), D, 3)
    with pytest.raises(ValueError, match="num_kv_heads=3 does not divide num_heads=4"):
        jf.init_multi_head_attention(jax.random.key(0), D, N, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"key/value heads K=3 .* do not divide query heads N=4"):
        jf.attend(rand(0, B, T, 4, H), rand(1, B, S, 3, H), rand(2, B, S, 3, H))
    with pytest.raises(ValueError, match=r"q \(2, 5, 4, 8\) and k, v \(7, 4, 8\) must have the same leading"):
        jf.attend(rand(0, B, T, N, H), rand(1, 7, N, H), rand(2, 7, N, H))
    with pytest.raises(TypeError, match="q must be a floating-point array, got dtype int32"):
        jf.scaled_dot_product_attention(jnp.ones((T, H), jnp.int32), rand(1, S, H), rand(2, S, H))
    with pytest.raises(ValueError, match=r"q and k head widths differ"):
        jf.scaled_dot_product_attention(rand(0, T, H), rand(1, S, 4), rand(2, S, H))
    with pytest.raises(ValueError, match="supports neither attention dropout nor returned weights"):
        jf.multi_head_attention(params, rand(0, B, T, D), return_weights=True, implementation="xla")


# ------------------------------------------------------ blockwise (flash) path


@pytest.mark.parametrize("is_causal,with_mask,with_bias,num_kv_heads,T_,S_,blocks", [
    (True, False, False, N, 37, 37, (8, 16)),      # causal skipping, neither length divides
    (True, True, True, 2, 37, 37, (16, 8)),        # GQA, padding mask, per-head bias
    (False, True, False, 1, 11, 29, (4, 8)),       # cross-attention shapes, multi-query
])
def test_blockwise_equals_reference_values_and_gradients(is_causal, with_mask, with_bias, num_kv_heads,
                                                          T_, S_, blocks):
    q, k, v = rand(0, B, T_, N, H), rand(1, B, S_, num_kv_heads, H), rand(2, B, S_, num_kv_heads, H)
    mask = random_mask(3, (B, 1, 1, S_)) if with_mask else None
    bias = rand(4, N, T_, S_) if with_bias else None
    probe = rand(5, B, T_, N, H)  # a random cotangent: every output entry matters

    def loss(impl, q, k, v, bias):
        if impl == "blockwise":
            out = jf.flash.blockwise_attention(q, k, v, mask=mask, bias=bias, is_causal=is_causal,
                                                   block_q=blocks[0], block_k=blocks[1])
        else:
            out = jf.attend(q, k, v, mask=mask, bias=bias, is_causal=is_causal)[0]
        return (out * probe).sum(), out

    argnums = (1, 2, 3, 4) if with_bias else (1, 2, 3)
    (_, ref), g_ref = jax.value_and_grad(loss, argnums=argnums, has_aux=True)("ref", q, k, v, bias)
    (_, out), g_blk = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True),
                              static_argnums=0)("blockwise", q, k, v, bias)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for a, b in zip(g_blk, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_backward_blocks_shrink_to_cache_sized_tiles():
    bb = jf.flash._backward_blocks
    assert bb(16 * 8, 256, 256) == (64, 64)      # lm-small: B·N = 128
    assert bb(8 * 8, 256, 256) == (64, 128)      # lm-medium: B·N = 64
    assert bb(1 * 8, 256, 256) == (256, 256)     # one long sequence: already cache-sized
    assert bb(64 * 8, 64, 64) == (64, 64)        # s2s-small: blocks at the minimum
    assert bb(16 * 8, 75, 256) == (75, 64)       # an odd block is never halved
    for rows, bq, bk in [(128, 256, 256), (64, 256, 128), (512, 64, 64)]:
        q_blk, k_blk = bb(rows, bq, bk)
        assert bq % q_blk == 0 and bk % k_blk == 0  # halves still tile the padded lengths


def test_blockwise_backward_blocks_smaller_than_forward_blocks(monkeypatch):
    """Backward tiles of 4 x 4 under forward blocks of 16 x 16, with padded keys (S = 24 is a
    multiple of the backward block but not of the forward one), causal, mask and bias."""
    monkeypatch.setattr(jf.flash, "_BACKWARD_TILE", 1)
    monkeypatch.setattr(jf.flash, "_MIN_BACKWARD_BLOCK", 4)
    assert jf.flash._backward_blocks(B * N, 16, 16) == (4, 4)
    T_, S_ = 37, 24
    q, k, v = rand(0, B, T_, N, H), rand(1, B, S_, 2, H), rand(2, B, S_, 2, H)
    mask, bias, probe = random_mask(3, (B, 1, 1, S_)), rand(4, N, T_, S_), rand(5, B, T_, N, H)

    def loss(impl, q, k, v, bias):
        if impl == "blockwise":
            out = jf.flash.blockwise_attention(q, k, v, mask=mask, bias=bias, is_causal=True,
                                                   block_q=16, block_k=16)
        else:
            out = jf.attend(q, k, v, mask=mask, bias=bias, is_causal=True)[0]
        return (out * probe).sum()

    g_ref = jax.grad(loss, argnums=(1, 2, 3, 4))("ref", q, k, v, bias)
    g_blk = jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4)), static_argnums=0)("blockwise", q, k, v, bias)
    for a, b in zip(g_blk, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_blockwise_is_selectable_per_call_and_in_models():
    params = jf.init_multi_head_attention(jax.random.key(0), D, N)
    x = rand(1, B, T, D)
    np.testing.assert_allclose(jf.multi_head_attention(params, x, is_causal=True, implementation="blockwise")[0],
                               jf.multi_head_attention(params, x, is_causal=True)[0], atol=1e-5)
    with pytest.raises(ValueError, match="dropout"):
        jf.attend(rand(0, B, T, N, H), rand(1, B, T, N, H), rand(2, B, T, N, H), key=jax.random.key(0),
                  dropout_rate=0.1, implementation="blockwise")


def test_blockwise_memory_grows_linearly_in_length():
    """XLA's own buffer plan (nothing runs): doubling T doubles blockwise temporaries, quadruples the reference's."""
    def temp_bytes(impl, T_):
        q = jax.ShapeDtypeStruct((1, T_, 2, 16), jnp.float32)

        def f(q, k, v):
            return jf.attend(q, k, v, is_causal=True, implementation=impl)[0].sum()

        compiled = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, q, q).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    ref = [temp_bytes(None, t) for t in (2048, 4096)]
    blk = [temp_bytes("blockwise", t) for t in (2048, 4096)]
    assert ref[1] / ref[0] > 3.5            # O(T²): the [N, T, T] weights
    assert blk[1] / blk[0] < 2.5            # O(T)
    assert blk[1] * 8 < ref[1]


def test_blockwise_fully_masked_rows_are_finite():
    q = rand(0, 1, 6, 2, 4)
    mask = jnp.zeros((1, 1, 1, 6), bool)
    out = jf.flash.blockwise_attention(q, q, q, mask=mask, block_q=2, block_k=2)
    np.testing.assert_allclose(out, jf.attend(q, q, q, mask=mask)[0], atol=1e-6)
    grads = jax.grad(lambda q: jf.flash.blockwise_attention(q, q, q, mask=mask, is_causal=True,
                                                                block_q=2, block_k=2).sum())(q)
    assert np.isfinite(np.asarray(grads)).all()


def _dot_generals(jaxpr):
    """Every dot_general equation in a jaxpr, including those inside scans, loops and custom VJPs."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _dot_generals(inner)


def test_blockwise_backward_products_contract_the_last_axis_of_their_left_operand():
    """The form XLA:CPU sends to its fast dot kernel: the backward works keys-by-queries
    (Pᵀ, dSᵀ) so dV = Pᵀ dO and dK = dSᵀ Q need no transposed left operand."""
    q = rand(0, 1, 12, 2, 4)

    def loss(q, k, v):
        return jf.flash.blockwise_attention(q, k, v, is_causal=True, block_q=4, block_k=4).sum()

    dots = list(_dot_generals(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, q, q).jaxpr))
    assert len(dots) >= 7  # forward: Q Kᵀ, P V; backward: K Qᵀ, dV, dPᵀ, dK, dQᵀ
    for eqn in dots:
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        assert tuple(lhs_contract) == (eqn.invars[0].aval.ndim - 1,), eqn
