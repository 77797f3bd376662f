"""Blocks and models: invariants of the stacks and the three model families."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jformer as jf

# Jitted applies keep the suite fast; test_scan_equals_unrolled_and_jit_equals_eager checks eager too.
STATIC = ("cfg", "exe", "train", "return_attention")
seq2seq_apply = jax.jit(jf.seq2seq_apply, static_argnames=STATIC)
lm_apply = jax.jit(jf.lm_apply, static_argnames=STATIC + ("causal",))
classifier_apply = jax.jit(jf.classifier_apply, static_argnames=STATIC)

CFG = jf.TransformerConfig(vocab_size=23, d_model=32, num_heads=4, num_layers=2, d_ff=48,
                           dropout_rate=0.0, max_len=16, pad_id=0)  # SRC, TGT are padded with 0
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
    unrolled = apply(params, SRC, TGT, cfg=cfg, exe=jf.ExecConfig(scan_layers=False))
    jitted = jax.jit(apply, static_argnames=("cfg", "exe"))(params, SRC, TGT, cfg=cfg)
    tree_close(scanned, unrolled)
    tree_close(scanned, jitted)


@pytest.mark.parametrize("remat", [True, "dots_with_no_batch_dims_saveable"])
def test_remat_gives_same_values_and_gradients(remat):
    params = jf.init_lm(jax.random.key(0), CFG)

    def loss(p, exe):
        return lm_apply(p, SRC, cfg=CFG, exe=exe)[0].astype(jnp.float32).std()

    v1, g1 = jax.value_and_grad(loss)(params, jf.ExecConfig(remat=False))
    v2, g2 = jax.value_and_grad(loss)(params, jf.ExecConfig(remat=remat))
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    tree_close(g1, g2)


def test_bfloat16_compute_keeps_float32_params_and_close_logits():
    cfg = CFG.replace(norm_position="pre")
    params = jf.init_seq2seq(jax.random.key(0), cfg)
    bf16 = jf.ExecConfig(compute_dtype="bfloat16")
    ref = seq2seq_apply(params, SRC, TGT, cfg=cfg)[0]
    low = seq2seq_apply(params, SRC, TGT, cfg=cfg, exe=bf16)[0]
    assert ref.dtype == jnp.float32 and low.dtype == jnp.bfloat16
    np.testing.assert_allclose(low.astype(jnp.float32), ref, atol=0.1)  # bf16 keeps ~3 significant digits
    assert not np.allclose(low.astype(jnp.float32), ref, atol=1e-4)      # ...so the switch really did something
    grads = jax.grad(lambda p: seq2seq_apply(p, SRC, TGT, cfg=cfg, exe=bf16)[0]
                     .astype(jnp.float32).std())(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))


def test_lm_is_causal():
    """Changing tokens after position t leaves the logits at positions <= t unchanged,
    and the gradient of logits[t] w.r.t. the input vectors after t is exactly zero."""
    for positions in ("sinusoidal", "rope", "alibi", "learned"):
        cfg = CFG.replace(positions=positions, pad_id=None)
        params = jf.init_lm(jax.random.key(0), cfg)
        a = lm_apply(params, SRC, cfg=cfg)[0]
        b = lm_apply(params, SRC.at[:, 3:].set(11), cfg=cfg)[0]
        np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-5)
        assert not np.allclose(a[:, 3:], b[:, 3:])
    x = jax.random.normal(jax.random.key(1), (1, 6, 32))
    enc = jf.init_encoder(jax.random.key(2), CFG)
    by_mask = jf.stack(jf.blocks.encoder_layer, enc, x, jf.Context(CFG, mask=jf.causal_mask(6)))[0]
    for impl in (None, "blockwise"):  # is_causal (what the LM passes) against an explicit mask
        def by_flag(x, ctx=jf.Context(CFG, jf.ExecConfig(attention_impl=impl), is_causal=True)):
            return jf.stack(jf.blocks.encoder_layer, enc, x, ctx)[0]
        np.testing.assert_allclose(by_flag(x), by_mask, atol=1e-5)
        influence = jnp.abs(jax.jacrev(by_flag)(x)).sum((0, 2, 3, 5))  # [t, s]
        assert float(jnp.triu(influence, 1).max()) == 0.0


def test_encoder_without_positions_is_permutation_equivariant():
    perm = jnp.array([3, 0, 4, 1, 2, 5])
    tokens = jnp.array([[5, 6, 7, 8, 9, 10]])
    for positions, equivariant in (("none", True), ("sinusoidal", False)):
        cfg = CFG.replace(positions=positions, num_classes=3)
        params = jf.init_classifier(jax.random.key(0), cfg)
        exe, ctx = jf.ExecConfig(), jf.Context(cfg)
        emb = jf.models._embed(params["embed"], tokens, cfg, exe, None)
        out = jf.stack(jf.blocks.encoder_layer, params["encoder"], emb, ctx)[0]
        out_perm = jf.stack(jf.blocks.encoder_layer, params["encoder"],
                            jf.models._embed(params["embed"], tokens[:, perm], cfg, exe, None), ctx)[0]
        assert np.allclose(out[:, perm], out_perm, atol=1e-5) == equivariant
    # Without positions, mean-pooled classification cannot see token order at all.
    cfg = CFG.replace(positions="none", num_classes=3)
    params = jf.init_classifier(jax.random.key(0), cfg)
    np.testing.assert_allclose(classifier_apply(params, tokens, cfg=cfg)[0],
                               classifier_apply(params, tokens[:, perm], cfg=cfg)[0], atol=1e-5)


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
    short = seq2seq_apply(params, SRC[1:, :3], TGT[1:, :3], cfg=cfg)[0]
    padded = seq2seq_apply(params, SRC[1:], TGT[1:], cfg=cfg)[0]
    np.testing.assert_allclose(short, padded[:, :3], atol=1e-5)


def test_vmap_over_examples_equals_batch():
    params = jf.init_seq2seq(jax.random.key(0), CFG)
    batch = seq2seq_apply(params, SRC, TGT, cfg=CFG)[0]
    per_example = jax.vmap(lambda s, t: seq2seq_apply(params, s[None], t[None], cfg=CFG)[0][0])(SRC, TGT)
    np.testing.assert_allclose(batch, per_example, atol=1e-5)


def test_norm_placement():
    post = jf.init_lm(jax.random.key(0), CFG)
    pre = jf.init_lm(jax.random.key(0), CFG.replace(norm_position="pre"))
    assert "final_norm" not in post["decoder"] and "final_norm" in pre["decoder"]
    # Post-LN: every position's output leaves a LayerNorm (zero mean, unit variance before scale/bias).
    x = jax.random.normal(jax.random.key(1), (2, 6, 32)) * 5
    y = jf.stack(jf.blocks.encoder_layer, post["decoder"], x, jf.Context(CFG))[0]
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-4)
    np.testing.assert_allclose(y.std(-1), 1.0, atol=1e-3)
    # Pre-LN without a final norm keeps the residual stream's scale.
    y_pre = jf.stack(jf.blocks.encoder_layer, pre["decoder"], x,
                     jf.Context(CFG.replace(norm_position="pre", final_norm=False)))[0]
    assert float(y_pre.std()) > 3.0


def test_norm_none_is_the_residual_sum_of_sublayers():
    """norm="none": a layer computes y = h + FFN(h), h = x + MHA(x), checked against the sublayers
    called by hand with the same parameters, and a Post-LN config gives the same function."""
    cfg = CFG.replace(norm="none", num_layers=1, pad_id=None)
    params = jf.init_lm(jax.random.key(0), cfg)["decoder"]
    assert params["layers"]["self_attn_norm"] == {} and params["layers"]["ffn_norm"] == {}
    x = jax.random.normal(jax.random.key(1), (2, 6, 32)) * 5
    layer = jax.tree_util.tree_map(lambda a: a[0], params["layers"])
    mask = jf.causal_mask(6)
    h = x + jf.multi_head_attention(layer["self_attn"], x, mask=mask)[0]
    y = h + jf.layers.feed_forward(layer["ffn"], h, activation=cfg.activation)
    for position in ("pre", "post"):
        c = cfg.replace(norm_position=position, final_norm=False)
        out = jf.stack(jf.blocks.encoder_layer, params, x, jf.Context(c, is_causal=True))[0]
        np.testing.assert_allclose(out, y, atol=1e-4, rtol=1e-5)


def test_lm_switches_causal_tokens_mask_embeddings():
    """causal=False: without positions the LM is permutation-equivariant (every key seen);
    tokens_mask equals the same padding given by pad_id; embeddings = the table's rows give
    the same logits; a cache with causal=False is refused."""
    cfg = CFG.replace(positions="none", pad_id=None)
    params = jf.init_lm(jax.random.key(0), cfg)
    tokens = jnp.array([[5, 6, 7, 8, 9, 3], [3, 4, 5, 11, 12, 2]])
    perm = jnp.array([3, 0, 5, 1, 4, 2])
    full = lm_apply(params, tokens, cfg=cfg, causal=False)[0]
    np.testing.assert_allclose(lm_apply(params, tokens[:, perm], cfg=cfg, causal=False)[0], full[:, perm], atol=1e-5)
    causal = lm_apply(params, tokens, cfg=cfg)[0]
    assert not np.allclose(lm_apply(params, tokens[:, perm], cfg=cfg)[0], causal[:, perm], atol=1e-3)
    padded = CFG.replace(positions="none")  # pad_id 0
    tok0 = tokens.at[:, 4:].set(0)
    np.testing.assert_allclose(lm_apply(params, tok0, cfg=cfg, tokens_mask=tok0 != 0)[0],
                               lm_apply(params, tok0, cfg=padded)[0], atol=1e-6)
    rows = params["embed"]["token"]["embedding"][tokens]
    np.testing.assert_allclose(lm_apply(params, tokens, cfg=cfg, embeddings=rows)[0], causal, atol=1e-6)
    with pytest.raises(ValueError, match="causal=False"):
        jf.lm_apply(params, tokens, cfg=cfg, causal=False, cache=jf.init_lm_cache(params, cfg, 2, 8))
    with pytest.raises(ValueError, match="embeddings of shape"):
        jf.lm_apply(params, tokens, cfg=cfg, embeddings=rows[:, :3])


def test_dropout_only_with_key():
    cfg = CFG.replace(dropout_rate=0.3, attention_dropout_rate=0.2)
    params = jf.init_seq2seq(jax.random.key(0), cfg)
    base = seq2seq_apply(params, SRC, TGT, cfg=cfg)[0]
    np.testing.assert_array_equal(base, seq2seq_apply(params, SRC, TGT, cfg=cfg)[0])
    a = seq2seq_apply(params, SRC, TGT, cfg=cfg, key=jax.random.key(1))[0]
    b = seq2seq_apply(params, SRC, TGT, cfg=cfg, key=jax.random.key(2))[0]
    assert not np.allclose(a, base) and not np.allclose(a, b)
    np.testing.assert_array_equal(a, seq2seq_apply(params, SRC, TGT, cfg=cfg, key=jax.random.key(1))[0])


def test_fused_attention_switch_in_models():
    for cfg in (CFG, CFG.replace(positions="alibi", num_kv_heads=2, norm_position="pre")):
        params = jf.init_seq2seq(jax.random.key(0), cfg)
        ref = seq2seq_apply(params, SRC, TGT, cfg=cfg)[0]
        for impl in ("xla", "blockwise"):
            np.testing.assert_allclose(seq2seq_apply(params, SRC, TGT, cfg=cfg,
                                                     exe=jf.ExecConfig(attention_impl=impl))[0],
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
    logits = lm_apply(jf.init_lm(jax.random.key(0), cfg), SRC, cfg=cfg)[0]
    assert logits.shape == (2, 6, 23) and bool(jnp.isfinite(logits).all())
    bn = cfg.replace(norm="batch")
    bn_params = jf.init_lm(jax.random.key(0), bn)
    assert "bias" in bn_params["decoder"]["layers"]["ffn_norm"]
    assert "bias" not in bn_params["decoder"]["layers"]["ffn"]["wo"]


def test_classifier_pooling():
    cfg = CFG.replace(num_classes=4, pooling="cls")
    params = jf.init_classifier(jax.random.key(0), cfg)
    logits = classifier_apply(params, SRC, cfg=cfg)[0]
    assert logits.shape == (2, 4)
    # CLS pooling reads position 0 only, but position 0 attends to every valid token.
    changed = classifier_apply(params, SRC.at[0, 2].set(1), cfg=cfg)[0]
    assert not np.allclose(logits[0], changed[0]) and np.allclose(logits[1], changed[1], atol=1e-6)
    with pytest.raises(ValueError, match="num_classes must be set"):
        jf.init_classifier(jax.random.key(0), CFG)


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown TransformerConfig options \['n_layers'\]"):
        CFG.replace(n_layers=3)
    with pytest.raises(ValueError, match=r"norm must be one of \('layer', 'rms', 'batch', 'none'\), got 'group'"):
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


# ------------------------------------------------------------ the redesigned API


def test_pad_id_default_none_attends_to_and_scores_token_zero():
    """By default no token is padding: an LM on raw ids attends to token 0 and scores it."""
    cfg = jf.TransformerConfig(vocab_size=23, d_model=32, num_heads=4, num_layers=2, d_ff=48,
                               dropout_rate=0.0, max_len=16)
    assert cfg.pad_id is None
    params = jf.init_lm(jax.random.key(0), cfg)
    tokens = jnp.array([[3, 0, 4, 5, 6, 0], [0, 7, 0, 8, 9, 1]])
    logits, aux = lm_apply(params, tokens, cfg=cfg, return_attention=True)
    changed = lm_apply(params, tokens.at[0, 1].set(5), cfg=cfg)[0]
    np.testing.assert_allclose(changed[0, :1], logits[0, :1], atol=1e-5)  # causal: the past is unchanged
    assert float(jnp.abs(changed[0, 2:] - logits[0, 2:]).min()) > 1e-4  # token 0 at position 1 was read
    # Every query attends to its earlier token-0 keys; a row starting with 0 is not empty.
    w = aux["attention"]  # [L, B, N, T, T]
    assert float(w[:, 0, :, 2:, 1].min()) > 0.0 and float(w[:, 1, :, :, 0].min()) > 0.0
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    # pad_id=0 (opt-in) masks them: a different function.
    padded = lm_apply(params, tokens, cfg=cfg.replace(pad_id=0))[0]
    assert not np.allclose(padded[0, 2:], logits[0, 2:], atol=1e-4)
    # The loss scores every target, token 0 included: weight B*T, the plain mean over all tokens.
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1)}
    loss, (metrics, _) = jf.training.lm_loss(params, {}, batch, cfg=cfg, train=False)
    assert int(metrics["weight"]) == tokens.size
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1).mean()
    np.testing.assert_allclose(loss, nll, rtol=1e-5)
    _, (padded_metrics, _) = jf.training.lm_loss(params, {}, batch, cfg=cfg.replace(pad_id=0), train=False)
    assert int(padded_metrics["weight"]) == int((batch["targets"] != 0).sum()) < tokens.size


def test_gelu_tanh_is_the_tanh_approximation():
    x = jax.random.normal(jax.random.key(0), (2, 5, 16)) * 2.0
    p = jf.layers.init_feed_forward(jax.random.key(1), 16, 32, activation="gelu_tanh")
    h = x @ p["wi"]["kernel"] + p["wi"]["bias"]
    formula = 0.5 * h * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h ** 3)))
    np.testing.assert_allclose(formula, jax.nn.gelu(h, approximate=True), atol=1e-6)
    expected = formula @ p["wo"]["kernel"] + p["wo"]["bias"]
    got = jf.layers.feed_forward(p, x, activation="gelu_tanh")
    np.testing.assert_allclose(got, expected, atol=1e-5)
    exact = jf.layers.feed_forward(p, x, activation="gelu")
    assert float(jnp.abs(got - exact).max()) > 1e-4  # not the exact (erf) GELU
    # And as a model option.
    assert "gelu_tanh" in jf.config.ACTIVATIONS
    cfg = CFG.replace(activation="gelu_tanh")
    params = jf.init_lm(jax.random.key(0), cfg)
    a = lm_apply(params, SRC, cfg=cfg)[0]
    b = lm_apply(params, SRC, cfg=cfg.replace(activation="gelu"))[0]
    assert bool(jnp.isfinite(a).all()) and not np.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_share_embeddings_one_table_for_source_target_and_head(tie):
    cfg = CFG.replace(share_embeddings=True, tie_embeddings=tie)
    params = jf.init_seq2seq(jax.random.key(0), cfg)
    assert "embed" in params and "src_embed" not in params and "tgt_embed" not in params
    assert ("head" in params) is not tie
    table = params["embed"]
    # The same function as separate tables that both hold the shared one (and, tied, whose head is it too).
    separate = {k: v for k, v in params.items() if k != "embed"}
    separate.update(src_embed=table, tgt_embed=table)
    ref = seq2seq_apply(separate, SRC, TGT, cfg=cfg.replace(share_embeddings=False))[0]
    logits = seq2seq_apply(params, SRC, TGT, cfg=cfg)[0]
    np.testing.assert_allclose(logits, ref, atol=1e-6)
    # Changing one row of the table moves both sides: token 3 is source-only, token 1 target-only.
    assert 3 not in np.asarray(TGT) and 1 not in np.asarray(SRC)
    for row in (3, 1):
        moved = {**params, "embed": {**table, "token": {"embedding": table["token"]["embedding"].at[row].add(1.0)}}}
        assert not np.allclose(seq2seq_apply(moved, SRC, TGT, cfg=cfg)[0], logits, atol=1e-4), row
    # The gradient reaching the shared table is the sum of what the source lookup, the target
    # lookup and (tied) the head send to their tables in the separate model.
    src, tgt = jnp.array([[5, 6, 7]]), jnp.array([[1, 2, 3]])

    def loss(p, cfg):
        return seq2seq_apply(p, src, tgt, cfg=cfg)[0][..., 4].sum()

    g = jax.grad(loss)(params, cfg)["embed"]["token"]["embedding"]
    g_sep = jax.grad(loss)(separate, cfg.replace(share_embeddings=False))
    g_src, g_tgt = (np.abs(np.asarray(g_sep[k]["token"]["embedding"])).sum(-1) for k in ("src_embed", "tgt_embed"))
    np.testing.assert_allclose(g, g_sep["src_embed"]["token"]["embedding"] + g_sep["tgt_embed"]["token"]["embedding"],
                               atol=1e-5)
    assert (g_src[[5, 6, 7]] > 0).all() and (g_tgt[[1, 2, 3]] > 0).all()
    assert (g_src[[0, 1, 2, 3, 4, 8]] == 0).all()
    assert (g_tgt[4] > 0) == tie and g_tgt[8] == 0  # ids no input uses: only the tied head reads row 4
    assert float(np.abs(np.asarray(g)).sum(-1)[[1, 5]].min()) > 0
    with pytest.raises(ValueError, match="share_embeddings needs one vocabulary"):
        CFG.replace(share_embeddings=True, src_vocab_size=30)
    CFG.replace(share_embeddings=True, src_vocab_size=CFG.vocab_size)  # the same vocabulary is fine


def test_explicit_masks_equal_pad_id_masks_and_hide_tokens():
    params = jf.init_seq2seq(jax.random.key(0), CFG)
    by_pad_id = seq2seq_apply(params, SRC, TGT, cfg=CFG)[0]
    explicit = seq2seq_apply(params, SRC, TGT, cfg=CFG.replace(pad_id=None), src_mask=SRC != 0,
                             tgt_mask=TGT != 0)[0]
    np.testing.assert_allclose(explicit, by_pad_id, atol=1e-6)
    both = seq2seq_apply(params, SRC, TGT, cfg=CFG, src_mask=SRC != 0, tgt_mask=TGT != 0)[0]
    np.testing.assert_allclose(both, by_pad_id, atol=1e-6)
    # An explicit src_mask hides source tokens without any pad_id: their values do not matter.
    cfg = CFG.replace(pad_id=None)
    src = jnp.array([[5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 7, 8]])
    src_mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], bool)
    other = jnp.where(src_mask, src, jnp.array([[11, 12, 13, 14, 15, 16]]))
    a = seq2seq_apply(params, src, TGT, cfg=cfg, src_mask=src_mask)[0]
    b = seq2seq_apply(params, other, TGT, cfg=cfg, src_mask=src_mask)[0]
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(seq2seq_apply(params, src, TGT, cfg=cfg)[0],
                           seq2seq_apply(params, other, TGT, cfg=cfg)[0], atol=1e-4)  # unmasked, they do
    # Target key padding: with a LEFT-padded target, real positions ignore the pads' values.
    tgt = jnp.array([[0, 0, 1, 9, 8, 7], [0, 1, 5, 4, 3, 2]])
    tgt_mask = tgt != 0
    garbage = jnp.where(tgt_mask, tgt, jnp.array([[13, 17, 0, 0, 0, 0], [21, 0, 0, 0, 0, 0]]))
    src_mask = SRC != 0
    c = seq2seq_apply(params, SRC, tgt, cfg=cfg, src_mask=src_mask, tgt_mask=tgt_mask)[0]
    d = seq2seq_apply(params, SRC, garbage, cfg=cfg, src_mask=src_mask, tgt_mask=tgt_mask)[0]
    np.testing.assert_allclose(jnp.where(tgt_mask[..., None], c, 0.0), jnp.where(tgt_mask[..., None], d, 0.0),
                               atol=1e-6)
    np.testing.assert_allclose(jnp.where(tgt_mask[..., None], seq2seq_apply(params, SRC, tgt, cfg=CFG)[0], 0.0),
                               jnp.where(tgt_mask[..., None], c, 0.0), atol=1e-6)  # pad_id=0 masks the same
    e = seq2seq_apply(params, SRC, garbage, cfg=cfg, src_mask=src_mask)[0]  # no target mask: the pads are read
    assert not np.allclose(jnp.where(tgt_mask[..., None], c, 0.0), jnp.where(tgt_mask[..., None], e, 0.0),
                           atol=1e-4)
    with pytest.raises(TypeError, match="src_mask must be boolean"):
        seq2seq_apply(params, SRC, TGT, cfg=cfg, src_mask=(SRC != 0).astype(jnp.int32))
    with pytest.raises(ValueError, match=r"tgt_mask of shape \(2, 4\) must match"):
        seq2seq_apply(params, SRC, TGT, cfg=cfg, tgt_mask=TGT[:, :4] != 0)


def test_src_max_len_bounds_learned_source_positions():
    cfg = CFG.replace(positions="learned", max_len=8, src_max_len=12)
    params = jf.init_seq2seq(jax.random.key(0), cfg)
    assert params["src_embed"]["position"]["embedding"].shape == (12, 32)
    assert params["tgt_embed"]["position"]["embedding"].shape == (8, 32)
    src = jnp.arange(10)[None] % 20 + 1  # longer than max_len, within src_max_len
    logits = seq2seq_apply(params, src, TGT[:1], cfg=cfg)[0]
    assert logits.shape == (1, 5, 23) and bool(jnp.isfinite(logits).all())
    with pytest.raises(ValueError, match=r"13 positions exceeds max_len=12"):
        seq2seq_apply(params, jnp.ones((1, 13), jnp.int32), TGT[:1], cfg=cfg)
    with pytest.raises(ValueError, match=r"9 positions exceeds max_len=8"):  # the target keeps max_len
        seq2seq_apply(params, src, jnp.ones((1, 9), jnp.int32), cfg=cfg)
    plain = cfg.replace(src_max_len=None)
    with pytest.raises(ValueError, match=r"10 positions exceeds max_len=8"):  # without it, max_len bounds both
        seq2seq_apply(jf.init_seq2seq(jax.random.key(0), plain), src, TGT[:1], cfg=plain)


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_reference_multi_head_attention_equals_fast_path(cross, masked):
    D, N, T, S = 32, 4, 5, 7
    params = jf.init_multi_head_attention(jax.random.key(0), D, N)
    x = jax.random.normal(jax.random.key(1), (2, T, D))
    kv = jax.random.normal(jax.random.key(2), (2, S, D)) if cross else None
    S = S if cross else T
    mask = (jax.random.bernoulli(jax.random.key(3), 0.6, (2, N, T, S)).at[..., 0].set(True)
            if masked else None)
    probe = jax.random.normal(jax.random.key(4), (2, T, D))

    def ref(p, x, kv):
        return jf.reference_multi_head_attention(p, x, kv, mask=mask)

    def fast(p, x, kv):
        return jf.multi_head_attention(p, x, kv, mask=mask)[0]

    np.testing.assert_allclose(fast(params, x, kv), ref(params, x, kv), atol=1e-5)
    argnums = (0, 1, 2) if cross else (0, 1)
    g_ref = jax.grad(lambda *a: (ref(*a) * probe).sum(), argnums)(params, x, kv)
    g_fast = jax.grad(lambda *a: (fast(*a) * probe).sum(), argnums)(params, x, kv)
    tree_close(g_fast, g_ref)
    if masked:  # the mask is used: without it the output differs
        assert not np.allclose(jf.reference_multi_head_attention(params, x, kv), ref(params, x, kv), atol=1e-4)


EXEC_VARIANTS = [
    dict(scan_layers=False),
    dict(remat=True),
    *[dict(remat=policy) for policy in jf.config.REMAT_POLICIES],
    dict(fast_dense=True),
    dict(attention_impl="xla"),
    dict(attention_impl="blockwise"),
    dict(scan_layers=False, remat=True, fast_dense=True, attention_impl="blockwise"),
]


@pytest.mark.parametrize("overrides", EXEC_VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_exec_config_never_changes_the_function(overrides):
    """Same params, any ExecConfig (float32): the same lm_apply logits and the same gradients."""
    cfg = CFG.replace(positions="rope", num_kv_heads=2, norm_position="pre")
    params = jf.init_lm(jax.random.key(0), cfg)
    base = jf.ExecConfig(scan_layers=True, remat=False, fast_dense=False, attention_impl=None)
    probe = jax.random.normal(jax.random.key(1), SRC.shape + (cfg.vocab_size,))

    @functools.partial(jax.jit, static_argnames="exe")
    def value_and_grad(p, exe):
        return jax.value_and_grad(lambda p: (lm_apply(p, SRC, cfg=cfg, exe=exe)[0] * probe).mean(),
                                  has_aux=False)(p), lm_apply(p, SRC, cfg=cfg, exe=exe)[0]

    (v0, g0), l0 = value_and_grad(params, base)
    (v1, g1), l1 = value_and_grad(params, base.replace(**overrides))
    np.testing.assert_allclose(l1, l0, atol=1e-5)
    np.testing.assert_allclose(v1, v0, atol=1e-6)
    tree_close(g1, g0)


@pytest.mark.parametrize("name,value", [("scan_layers", False), ("remat", True), ("attention_impl", "xla"),
                                        ("compute_dtype", "bfloat16"), ("fast_dense", True),
                                        ("batch_norm_axis_name", "batch")])
def test_exec_options_are_not_model_options(name, value):
    with pytest.raises(ValueError, match=rf"unknown TransformerConfig options \['{name}'\]"):
        CFG.replace(**{name: value})
    with pytest.raises(TypeError, match=name):
        jf.TransformerConfig(**{name: value})
    assert getattr(jf.ExecConfig(**{name: value}), name) == value


def test_exec_config_validates_its_choices():
    for name, value in (("attention_impl", "flash"), ("compute_dtype", "float16"), ("remat", "nothing"),
                        ("fast_dense", "yes")):
        with pytest.raises(ValueError, match=rf"ExecConfig\.{name} must be one of .*got {value!r}"):
            jf.ExecConfig(**{name: value})
    with pytest.raises(ValueError, match=r"unknown ExecConfig options \['scan'\]"):
        jf.ExecConfig().replace(scan=False)
    assert jf.ExecConfig().replace(remat="dots_saveable").remat == "dots_saveable"
    assert hash(jf.ExecConfig()) == hash(jf.ExecConfig())  # hashable: a static jit argument
