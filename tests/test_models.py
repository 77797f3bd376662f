"""Blocks and models: invariants of the stacks and the three model families."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jformer as jf

# Jitted applies keep the suite fast; test_scan_equals_unrolled_and_jit_equals_eager checks eager too.
STATIC = ("cfg", "train", "return_attention")
seq2seq_apply = jax.jit(jf.seq2seq_apply, static_argnames=STATIC)
lm_apply = jax.jit(jf.lm_apply, static_argnames=STATIC)
classifier_apply = jax.jit(jf.classifier_apply, static_argnames=STATIC)

CFG = jf.TransformerConfig(vocab_size=23, d_model=32, num_heads=4, num_layers=2, d_ff=48,
                           dropout_rate=0.0, max_len=16)
SRC = jnp.array([[5, 6, 7, 8, 9, 0], [3, 4, 5, 0, 0, 0]])
TGT = jnp.array([[1, 9, 8, 7, 6], [1, 5, 4, 0, 0]])


def tree_close(a, b, atol=1e-5):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol), a, b)


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(norm_position="pre", positions="rope", activation="swiglu", num_kv_heads=2),
    dict(norm="batch", positions="alibi"),
])
def test_scan_equals_unrolled_and_jit_equals_eager(overrides):
    cfg = CFG.replace(**overrides)
    params = jf.init_seq2seq(jax.random.key(0), cfg)
    state = jf.init_state(params, cfg)
    apply = functools.partial(jf.seq2seq_apply, state=state, train=True, return_attention=True)
    scanned = apply(params, SRC, TGT, cfg=cfg)
    unrolled = apply(params, SRC, TGT, cfg=cfg.replace(scan_layers=False))
    jitted = jax.jit(apply, static_argnames="cfg")(params, SRC, TGT, cfg=cfg)
    tree_close(scanned, unrolled)
    tree_close(scanned, jitted)


@pytest.mark.parametrize("remat", [True, "dots_with_no_batch_dims_saveable"])
def test_remat_gives_same_values_and_gradients(remat):
    params = jf.init_lm(jax.random.key(0), CFG)

    def loss(p, cfg):
        return lm_apply(p, SRC, cfg=cfg).astype(jnp.float32).std()

    v1, g1 = jax.value_and_grad(loss)(params, CFG.replace(remat=False))
    v2, g2 = jax.value_and_grad(loss)(params, CFG.replace(remat=remat))
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    tree_close(g1, g2)


def test_bfloat16_compute_keeps_float32_params_and_close_logits():
    cfg = CFG.replace(norm_position="pre")
    params = jf.init_seq2seq(jax.random.key(0), cfg)
    ref = seq2seq_apply(params, SRC, TGT, cfg=cfg)
    low = seq2seq_apply(params, SRC, TGT, cfg=cfg.replace(compute_dtype="bfloat16"))
    assert ref.dtype == jnp.float32 and low.dtype == jnp.bfloat16
    np.testing.assert_allclose(low.astype(jnp.float32), ref, atol=0.1)  # bf16 keeps ~3 significant digits
    assert not np.allclose(low.astype(jnp.float32), ref, atol=1e-4)      # ...so the switch really did something
    grads = jax.grad(lambda p: seq2seq_apply(p, SRC, TGT, cfg=cfg.replace(compute_dtype="bfloat16"))
                     .astype(jnp.float32).std())(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))


def test_lm_is_causal():
    """Changing tokens after position t leaves the logits at positions <= t unchanged,
    and the gradient of logits[t] w.r.t. the input vectors after t is exactly zero."""
    for positions in ("sinusoidal", "rope", "alibi", "learned"):
        cfg = CFG.replace(positions=positions, pad_id=None)
        params = jf.init_lm(jax.random.key(0), cfg)
        a = lm_apply(params, SRC, cfg=cfg)
        b = lm_apply(params, SRC.at[:, 3:].set(11), cfg=cfg)
        np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-5)
        assert not np.allclose(a[:, 3:], b[:, 3:])
    x = jax.random.normal(jax.random.key(1), (1, 6, 32))
    enc = jf.init_encoder(jax.random.key(2), CFG)
    by_mask = jf.encoder(enc, x, cfg=CFG, mask=jf.causal_mask(6))[0]
    for impl in (None, "blockwise"):  # is_causal (what the LM passes) against an explicit mask
        def by_flag(x, cfg=CFG.replace(attention_impl=impl)):
            return jf.encoder(enc, x, cfg=cfg, is_causal=True)[0]
        np.testing.assert_allclose(by_flag(x), by_mask, atol=1e-5)
        influence = jnp.abs(jax.jacrev(by_flag)(x)).sum((0, 2, 3, 5))  # [t, s]
        assert float(jnp.triu(influence, 1).max()) == 0.0


def test_encoder_without_positions_is_permutation_equivariant():
    perm = jnp.array([3, 0, 4, 1, 2, 5])
    tokens = jnp.array([[5, 6, 7, 8, 9, 10]])
    for positions, equivariant in (("none", True), ("sinusoidal", False)):
        cfg = CFG.replace(positions=positions, num_classes=3)
        params = jf.init_classifier(jax.random.key(0), cfg)
        emb = jf.models._embed(params["embed"], tokens, cfg, None)
        out = jf.encoder(params["encoder"], emb, cfg=cfg)[0]
        out_perm = jf.encoder(params["encoder"], jf.models._embed(params["embed"], tokens[:, perm], cfg, None),
                              cfg=cfg)[0]
        assert np.allclose(out[:, perm], out_perm, atol=1e-5) == equivariant
    # Without positions, mean-pooled classification cannot see token order at all.
    cfg = CFG.replace(positions="none", num_classes=3)
    params = jf.init_classifier(jax.random.key(0), cfg)
    np.testing.assert_allclose(classifier_apply(params, tokens, cfg=cfg),
                               classifier_apply(params, tokens[:, perm], cfg=cfg), atol=1e-5)


def test_batch_norm_state_train_updates_eval_uses_running_stats():
    cfg = CFG.replace(norm="batch")
    params = jf.init_lm(jax.random.key(0), cfg)
    state = jf.init_state(params, cfg)
    assert state["decoder"]["layers"]["ffn_norm"]["mean"].shape == (2, 32)
    _, aux = lm_apply(params, SRC, cfg=cfg, state=state, train=True)
    new = aux["state"]
    assert not np.allclose(new["decoder"]["layers"]["ffn_norm"]["mean"], 0.0)
    # Eval: the running statistics normalise, so one example's output does not
    # depend on what else is in the batch, and the state is returned unchanged.
    alone, aux_eval = lm_apply(params, SRC[:1], cfg=cfg, state=new)
    together, _ = lm_apply(params, SRC, cfg=cfg, state=new)
    np.testing.assert_allclose(alone[0], together[0], atol=1e-5)
    tree_close(aux_eval["state"], new)
    # Train mode: batch statistics, so the batch composition matters.
    t_alone, _ = lm_apply(params, SRC[:1], cfg=cfg, state=new, train=True)
    t_together, _ = lm_apply(params, SRC, cfg=cfg, state=new, train=True)
    assert not np.allclose(t_alone[0], t_together[0], atol=1e-3)
    with pytest.raises(ValueError, match="needs its running statistics"):
        lm_apply(params, SRC, cfg=cfg)


def test_padding_does_not_change_valid_outputs():
    cfg = CFG
    params = jf.init_seq2seq(jax.random.key(0), cfg)
    short = seq2seq_apply(params, SRC[1:, :3], TGT[1:, :3], cfg=cfg)
    padded = seq2seq_apply(params, SRC[1:], TGT[1:], cfg=cfg)
    np.testing.assert_allclose(short, padded[:, :3], atol=1e-5)


def test_vmap_over_examples_equals_batch():
    params = jf.init_seq2seq(jax.random.key(0), CFG)
    batch = seq2seq_apply(params, SRC, TGT, cfg=CFG)
    per_example = jax.vmap(lambda s, t: seq2seq_apply(params, s[None], t[None], cfg=CFG)[0])(SRC, TGT)
    np.testing.assert_allclose(batch, per_example, atol=1e-5)


def test_norm_placement():
    post = jf.init_lm(jax.random.key(0), CFG)
    pre = jf.init_lm(jax.random.key(0), CFG.replace(norm_position="pre"))
    assert "final_norm" not in post["decoder"] and "final_norm" in pre["decoder"]
    # Post-LN: every position's output leaves a LayerNorm (zero mean, unit variance before scale/bias).
    x = jax.random.normal(jax.random.key(1), (2, 6, 32)) * 5
    y = jf.encoder(post["decoder"], x, cfg=CFG)[0]
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-4)
    np.testing.assert_allclose(y.std(-1), 1.0, atol=1e-3)
    # Pre-LN without a final norm keeps the residual stream's scale.
    y_pre = jf.encoder(pre["decoder"], x, cfg=CFG.replace(norm_position="pre", final_norm=False))[0]
    assert float(y_pre.std()) > 3.0


def test_dropout_only_with_key():
    cfg = CFG.replace(dropout_rate=0.3, attention_dropout_rate=0.2)
    params = jf.init_seq2seq(jax.random.key(0), cfg)
    base = seq2seq_apply(params, SRC, TGT, cfg=cfg)
    np.testing.assert_array_equal(base, seq2seq_apply(params, SRC, TGT, cfg=cfg))
    a = seq2seq_apply(params, SRC, TGT, cfg=cfg, key=jax.random.key(1))
    b = seq2seq_apply(params, SRC, TGT, cfg=cfg, key=jax.random.key(2))
    assert not np.allclose(a, base) and not np.allclose(a, b)
    np.testing.assert_array_equal(a, seq2seq_apply(params, SRC, TGT, cfg=cfg, key=jax.random.key(1)))


def test_fused_attention_switch_in_models():
    for cfg in (CFG, CFG.replace(positions="alibi", num_kv_heads=2, norm_position="pre")):
        params = jf.init_seq2seq(jax.random.key(0), cfg)
        ref = seq2seq_apply(params, SRC, TGT, cfg=cfg)
        for impl in ("xla", "blockwise"):
            np.testing.assert_allclose(seq2seq_apply(params, SRC, TGT, cfg=cfg.replace(attention_impl=impl)),
                                       ref, atol=1e-5)


def test_attention_maps_and_tied_head():
    cfg = CFG.replace(tie_embeddings=True)
    params = jf.init_lm(jax.random.key(0), cfg)
    assert "head" not in params
    logits, aux = lm_apply(params, SRC, cfg=cfg, return_attention=True)
    w = aux["attention"]
    assert logits.shape == (2, 6, 23) and w.shape == (2, 2, 4, 6, 6)  # [L, B, N, T, T]
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    assert float(w[:, 1, :, :, 3:].max()) == 0.0  # example 1's padding is never attended
    assert aux["state"] == {}


def _leaves(params):
    """{"a/b/kernel": array} for every leaf of a params tree."""
    return {"/".join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def _check_std(a, std, name):
    """a ~ N(0, std²): sample std within 3% (≥ 16k samples: the estimate's own error is < 1%)."""
    a = np.asarray(a, np.float64)
    assert a.size >= 16384, name
    assert abs(a.mean()) < 0.03 * std, (name, a.mean())
    np.testing.assert_allclose(a.std(), std, rtol=0.03, err_msg=name)


@pytest.mark.parametrize("model", ["lm", "seq2seq"])
def test_gpt2_init(model):
    """init="gpt2" (nanoGPT): kernels, embeddings and heads ~ N(0, 0.02²), the two residual
    projections (attention ``out``, FFN ``wo``) ~ N(0, (0.02 / √(2L))²) with L the depth of
    their own stack, biases 0, norms 1/0."""
    cfg = CFG.replace(vocab_size=300, d_model=128, d_ff=512, num_layers=2, num_decoder_layers=6,
                      positions="learned", max_len=128, init="gpt2")
    # Compiled for compilation speed (as experiments.common.init_state): 6 s instead of 20.
    init = jax.jit({"lm": jf.init_lm, "seq2seq": jf.init_seq2seq}[model], static_argnums=1,
                   compiler_options={"xla_backend_optimization_level": 0})
    leaves = _leaves(init(jax.random.key(0), cfg))
    depth = {"encoder": 2, "decoder": 6 if model == "seq2seq" else 2}
    seen = set()
    for name, a in leaves.items():
        last = name.split("/")[-1]
        if last == "bias":
            np.testing.assert_array_equal(a, 0.0, err_msg=name)
        elif last == "scale":
            np.testing.assert_array_equal(a, 1.0, err_msg=name)
        else:
            residual = last == "kernel" and (name.endswith("attn/out/kernel") or name.endswith("ffn/wo/kernel"))
            L = depth[name.split("/")[0]] if residual else None
            _check_std(a, 0.02 / np.sqrt(2 * L) if residual else 0.02, name)
            seen.add("residual" if residual else last)
    assert seen == {"residual", "kernel", "embedding"}
    # The default init is unchanged: Glorot-uniform kernels (std √(2 / (fan_in + fan_out))).
    default = _leaves(init(jax.random.key(0), cfg.replace(init="default")))
    key = [n for n in default if n.endswith("ffn/wo/kernel")][0]
    np.testing.assert_allclose(default[key].std(), np.sqrt(2 / (512 + 128)), rtol=0.03)
    with pytest.raises(ValueError, match=r"init must be one of \('default', 'gpt2'\), got 'xavier'"):
        CFG.replace(init="xavier")


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_use_bias_false_has_no_bias_anywhere(norm_position):
    """use_bias=False: no dense and no LayerNorm bias in any model (nanoGPT's bias=False);
    the models still run, and BatchNorm keeps its shift."""
    cfg = CFG.replace(use_bias=False, norm_position=norm_position, final_norm=True, num_classes=3)
    for init in (jf.init_lm, jf.init_seq2seq):
        params = init(jax.random.key(0), cfg)
        assert not [n for n in _leaves(params) if n.endswith("bias")], init.__name__
        assert "scale" in params["decoder"]["final_norm"]
    classifier = jf.init_classifier(jax.random.key(0), cfg)
    assert [n for n in _leaves(classifier) if n.endswith("bias")] == ["head/bias"]  # the class head keeps one
    logits = lm_apply(jf.init_lm(jax.random.key(0), cfg), SRC, cfg=cfg)
    assert logits.shape == (2, 6, 23) and bool(jnp.isfinite(logits).all())
    bn = cfg.replace(norm="batch")
    bn_params = jf.init_lm(jax.random.key(0), bn)
    assert "bias" in bn_params["decoder"]["layers"]["ffn_norm"]
    assert "bias" not in bn_params["decoder"]["layers"]["ffn"]["wo"]


def test_classifier_pooling():
    cfg = CFG.replace(num_classes=4, pooling="cls")
    params = jf.init_classifier(jax.random.key(0), cfg)
    logits = classifier_apply(params, SRC, cfg=cfg)
    assert logits.shape == (2, 4)
    # CLS pooling reads position 0 only, but position 0 attends to every valid token.
    changed = classifier_apply(params, SRC.at[0, 2].set(1), cfg=cfg)
    assert not np.allclose(logits[0], changed[0]) and np.allclose(logits[1], changed[1], atol=1e-6)
    with pytest.raises(ValueError, match="num_classes must be set"):
        jf.init_classifier(jax.random.key(0), CFG)


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown TransformerConfig options \['n_layers'\]"):
        CFG.replace(n_layers=3)
    with pytest.raises(ValueError, match=r"norm must be one of \('layer', 'rms', 'batch'\), got 'group'"):
        CFG.replace(norm="group")
    with pytest.raises(ValueError, match="positions must be one of"):
        CFG.replace(positions="relative")
    with pytest.raises(ValueError, match="num_heads=5 does not divide d_model=32"):
        CFG.replace(num_heads=5)
    with pytest.raises(ValueError, match="num_kv_heads=3 does not divide num_heads=4"):
        CFG.replace(num_kv_heads=3)
    with pytest.raises(ValueError, match="dropout_rate must be in"):
        CFG.replace(dropout_rate=1.5)
    params = jf.init_lm(jax.random.key(0), CFG.replace(positions="learned"))
    with pytest.raises(ValueError, match="exceeds max_len=16"):
        lm_apply(params, jnp.ones((1, 20), jnp.int32), cfg=CFG.replace(positions="learned"))
    with pytest.raises(ValueError, match=r"tokens must be integer token ids \[B, T\]"):
        lm_apply(params, jnp.ones((1, 4)), cfg=CFG)
