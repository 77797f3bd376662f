"""jformer.training: schedules, optimizers, TrainState, model losses, train/eval steps.

cross_entropy / token_accuracy themselves are tested in tests/test_quickstart.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jformer as jf
from jformer import training as tr
from jformer.config import ExecConfig

# Jitted model functions keep the suite fast (eager dispatch of a whole model is slow).
STATIC = ("cfg", "exe", "label_smoothing", "train", "accuracy")
lm_loss = jax.jit(tr.lm_loss, static_argnames=STATIC)
lm_apply = jax.jit(jf.lm_apply, static_argnames="cfg")
init_lm = jax.jit(jf.init_lm, static_argnums=1)

CFG = jf.TransformerConfig(vocab_size=19, d_model=16, num_heads=2, num_layers=1, d_ff=32,
                           dropout_rate=0.1, max_len=16, pad_id=0)


def lm_batch(seed=0, B=4, T=8, pad_tail=True):
    """Random LM batch; with pad_tail the last positions of later rows are padding (0)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CFG.vocab_size, size=(B, T + 1))
    if pad_tail:
        for b in range(B):
            tokens[b, T + 1 - b:] = 0
    return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}


def copy(tree):
    """A fresh copy: train_step donates its state, so a state used twice must be copied."""
    return jax.tree.map(jnp.copy, tree)


def lm_state(cfg=CFG, seed=0):
    """(TrainState, tx, lr) of a fresh tiny LM with AdamW."""
    tx, lr = tr.make_optimizer("adamw", learning_rate=1e-2, warmup_steps=2, total_steps=100)
    params = init_lm(jax.random.key(seed), cfg)
    return tr.TrainState.create(params, tx, jax.random.key(seed + 1), jf.init_state(params, cfg)), tx, lr


# ------------------------------------------------------------ schedules


def test_perplexity():
    np.testing.assert_allclose(float(tr.perplexity(np.log(7.0))), 7.0, rtol=1e-6)
    assert float(tr.perplexity(0.0)) == 1.0


def test_noam_schedule_known_values():
    d, w = 512, 4000
    lr = tr.noam_schedule(d, w)

    def formula(s, scale=1.0):
        return scale * d ** -0.5 * min(s ** -0.5, s * w ** -1.5)

    # optax counts updates from 0; the paper's step s = count + 1.
    np.testing.assert_allclose(float(lr(0)), d ** -0.5 * w ** -1.5, rtol=1e-6)   # finite at the first update
    np.testing.assert_allclose(float(lr(w - 1)), d ** -0.5 * w ** -0.5, rtol=1e-6)  # the peak
    for count in (0, 9, 999, 3999, 4000, 9999, 99999):
        np.testing.assert_allclose(float(lr(count)), formula(count + 1), rtol=1e-5)
    np.testing.assert_allclose(float(tr.noam_schedule(d, w, scale=2.0)(9)), formula(10, 2.0), rtol=1e-5)
    # make_schedule("paper"): learning_rate is the multiplier; total_steps / min_learning_rate do not apply.
    paper = tr.make_schedule("paper", learning_rate=2.0, d_model=d, warmup_steps=w, total_steps=10,
                             min_learning_rate=1.0)
    np.testing.assert_allclose(float(paper(9)), formula(10, 2.0), rtol=1e-5)
    values = np.asarray(jax.vmap(lr)(jnp.arange(3 * w)))
    assert values.argmax() == w - 1
    np.testing.assert_allclose(float(lr(4 * w - 1)), d ** -0.5 * (4 * w) ** -0.5, rtol=1e-5)


def test_adamw_schedule_and_logged_learning_rate():
    sched = tr.make_schedule("adamw", learning_rate=1.0, warmup_steps=4, total_steps=12,
                             min_learning_rate=0.1)
    np.testing.assert_allclose([float(sched(c)) for c in (0, 2, 4, 8, 12, 50)],
                               [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1, 0.1], atol=1e-6)
    # With accumulation the schedule advances once per k train steps.
    _, lr = tr.make_optimizer("adamw", learning_rate=1.0, warmup_steps=4, total_steps=12,
                              min_learning_rate=0.1, accumulate_steps=3)
    for step in range(12):
        np.testing.assert_allclose(float(lr(step)), float(sched(step // 3)), rtol=1e-6)


def test_option_errors():
    with pytest.raises(ValueError, match="valid"):
        tr.make_optimizer("sgd", learning_rate=1.0)
    with pytest.raises(ValueError, match="weight decay"):
        tr.make_optimizer("paper", d_model=16, weight_decay=0.1)
    with pytest.raises(ValueError, match="d_model"):
        tr.make_optimizer("paper")
    with pytest.raises(ValueError, match="total_steps"):
        tr.make_optimizer("adamw", learning_rate=1e-3)


# ----------------------------------------------------------- optimizers


def test_paper_optimizer_is_adam_098_1e9_on_noam():
    """Three updates equal a hand-written Adam (β1 0.9, β2 0.98, ε 1e-9, bias-corrected)."""
    d, w = 16, 3
    tx, lr = tr.make_optimizer("paper", d_model=d, warmup_steps=w)
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
    opt_state = tx.init(params)
    theta = np.asarray(params["w"], np.float64)
    m = v = np.zeros_like(theta)
    for t in range(1, 4):
        g = rng.normal(size=theta.shape) * t  # varying scales: β1, β2 and bias correction all matter
        updates, opt_state = tx.update({"w": jnp.asarray(g, jnp.float32)}, opt_state, params)
        params = optax.apply_updates(params, updates)
        m = 0.9 * m + 0.1 * g
        v = 0.98 * v + 0.02 * g * g
        m_hat, v_hat = m / (1 - 0.9 ** t), v / (1 - 0.98 ** t)
        step_lr = d ** -0.5 * min(t ** -0.5, t * w ** -1.5)
        np.testing.assert_allclose(float(lr(t - 1)), step_lr, rtol=1e-6)
        theta = theta - step_lr * m_hat / (np.sqrt(v_hat) + 1e-9)
        np.testing.assert_allclose(np.asarray(params["w"]), theta, rtol=1e-5, atol=1e-7)
    adam_state = opt_state[0]
    assert isinstance(adam_state, optax.ScaleByAdamState) and int(adam_state.count) == 3
    # ε = 1e-9: a first update with |g| = 1e-9 is -lr · g / (|g| + ε) = -lr / 2 (ε = 1e-8 would give -lr / 11).
    params = {"w": jnp.zeros(3)}
    updates, _ = tx.update({"w": jnp.full(3, 1e-9)}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -float(lr(0)) / 2, rtol=1e-4)


def test_weight_decay_masks_all_but_kernels():
    params = {"dense": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.ones(2)},
              "norm": {"scale": jnp.ones(2), "bias": jnp.full(2, 0.5)},
              "embed": {"embedding": jnp.ones((5, 2))},
              "layers": {"attn": {"query": {"kernel": jnp.ones((2, 1, 4, 2))}}}}  # stacked [L, ...]
    tx, lr = tr.make_optimizer("adamw", learning_rate=0.1, warmup_steps=0, total_steps=10, weight_decay=0.5)
    opt_state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)  # Adam's update of a zero gradient is 0
    new = params
    for _ in range(3):
        updates, opt_state = tx.update(zeros, opt_state, new)
        new = optax.apply_updates(new, updates)
    shrink = np.prod([1 - float(lr(t)) * 0.5 for t in range(3)])
    np.testing.assert_allclose(new["dense"]["kernel"], 2.0 * shrink, rtol=1e-6)
    np.testing.assert_allclose(new["layers"]["attn"]["query"]["kernel"], shrink, rtol=1e-6)
    for path in (("dense", "bias"), ("norm", "scale"), ("norm", "bias"), ("embed", "embedding")):
        np.testing.assert_array_equal(new[path[0]][path[1]], params[path[0]][path[1]])
    # On a real model only `kernel` leaves are decayed.
    mask = tr.decay_mask(init_lm(jax.random.key(0), CFG))
    for path, decayed in jax.tree_util.tree_leaves_with_path(mask):
        assert decayed == (path[-1].key == "kernel"), path


def test_matrices_decay_rule_decays_every_matrix_and_embedding():
    """decay="matrices" (nanoGPT: p.dim() >= 2): kernels and embeddings, never biases or scales."""
    params = {"dense": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.ones(2)},
              "norm": {"scale": jnp.ones(2), "bias": jnp.full(2, 0.5)},
              "embed": {"token": {"embedding": jnp.ones((5, 2))}, "position": {"embedding": jnp.ones((4, 2))}}}
    mask = tr.decay_mask(params, "matrices")
    for path, decayed in jax.tree_util.tree_leaves_with_path(mask):
        leaf = params
        for k in path:
            leaf = leaf[k.key]
        assert decayed == (leaf.ndim >= 2), path  # unstacked: exactly the ndim >= 2 leaves
    # A zero-gradient step shrinks an embedding by lr · wd, and leaves biases and scales alone.
    lr, wd = 0.1, 0.5
    tx, _ = tr.make_optimizer("adamw", learning_rate=lr, warmup_steps=0, total_steps=10, weight_decay=wd,
                              decay="matrices")
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["embed"]["token"]["embedding"], 1 - lr * wd, rtol=1e-6)
    np.testing.assert_allclose(new["embed"]["position"]["embedding"], 1 - lr * wd, rtol=1e-6)
    np.testing.assert_allclose(new["dense"]["kernel"], 2.0 * (1 - lr * wd), rtol=1e-6)
    for path in (("dense", "bias"), ("norm", "scale"), ("norm", "bias")):
        np.testing.assert_array_equal(new[path[0]][path[1]], params[path[0]][path[1]])
    # On a real model (layers stacked on [L], so biases and scales are [L, D]): exactly the
    # leaves torch would hold as matrices, i.e. kernels and the (tied) token / position embeddings.
    cfg = CFG.replace(positions="learned", tie_embeddings=True, num_layers=2)
    mask = tr.decay_mask(init_lm(jax.random.key(0), cfg), "matrices")
    leaves = {path[-1].key: [] for path, _ in jax.tree_util.tree_leaves_with_path(mask)}
    for path, decayed in jax.tree_util.tree_leaves_with_path(mask):
        leaves[path[-1].key].append(decayed)
    assert leaves.keys() == {"kernel", "bias", "scale", "embedding"}
    assert all(leaves["kernel"]) and all(leaves["embedding"]) and len(leaves["embedding"]) == 2
    assert not any(leaves["bias"]) and not any(leaves["scale"])
    with pytest.raises(ValueError, match="decay must be one of"):
        tr.make_optimizer("adamw", learning_rate=lr, total_steps=10, warmup_steps=0, decay="all")


@pytest.mark.parametrize("eps", [1e-8, 1e-9])
def test_adamw_eps_is_passed_through(eps):
    """A first update with |g| = 1e-9 is -lr · g / (|g| + ε): -lr/2 at ε = 1e-9, -lr/11 at 1e-8."""
    tx, lr = tr.make_optimizer("adamw", learning_rate=0.1, warmup_steps=0, total_steps=10, eps=eps)
    params = {"w": jnp.zeros(3)}
    updates, _ = tx.update({"w": jnp.full(3, 1e-9)}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -float(lr(0)) * 1e-9 / (1e-9 + eps), rtol=1e-4)


def test_clipping_bounds_the_gradient_adam_sees():
    """With clip_norm 1, a gradient 1000·g (‖g‖ = 0.5) reaches Adam as 2·g."""
    g = jnp.asarray([0.3, -0.4])  # norm 0.5, below the threshold: passes unchanged
    params = jnp.zeros(2)

    def run(tx, grads):
        state, out = tx.init(params), []
        for grad in grads:
            upd, state = tx.update(grad, state, params)
            out.append(upd)
        return out

    kw = dict(learning_rate=0.1, warmup_steps=0, total_steps=10)
    clipped = run(tr.make_optimizer("adamw", clip_norm=1.0, **kw)[0], [g, 1000 * g])
    reference = run(tr.make_optimizer("adamw", **kw)[0], [g, 2 * g])
    unclipped = run(tr.make_optimizer("adamw", **kw)[0], [g, 1000 * g])
    np.testing.assert_allclose(clipped[1], reference[1], rtol=1e-6)
    assert not np.allclose(unclipped[1], reference[1], rtol=1e-3)


def _least_squares_loss(params, model_state, batch, key=None, train=True):
    """Mean squared error of a linear model (a mean over the batch), in the loss_fn protocol."""
    loss = jnp.mean((batch["x"] @ params["dense"]["kernel"] + params["dense"]["bias"] - batch["y"]) ** 2)
    return loss, ({"loss": loss}, model_state)


def test_gradient_accumulation_equals_one_step_on_the_concatenated_batch():
    k, rng = 4, np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(16, 5)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)}
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "bias": jnp.zeros(3)}}
    kw = dict(learning_rate=0.05, warmup_steps=0, total_steps=10, weight_decay=0.1, clip_norm=0.5)
    tx1, _ = tr.make_optimizer("adamw", **kw)
    txk, _ = tr.make_optimizer("adamw", accumulate_steps=k, **kw)
    full = tr.TrainState.create(params, tx1, jax.random.key(0))
    micro = tr.TrainState.create(copy(params), txk, jax.random.key(0))
    step1, stepk = tr.make_train_step(_least_squares_loss, tx1), tr.make_train_step(_least_squares_loss, txk)
    for _ in range(2):  # two effective updates (Adam moments and the schedule carry over)
        full, _ = step1(full, batch)
        for i in range(k):
            before = copy(micro.params)
            micro, _ = stepk(micro, jax.tree.map(lambda a: a[i * 4:(i + 1) * 4], batch))
            if i < k - 1:  # params move only on the k-th micro-step
                jax.tree.map(np.testing.assert_array_equal, micro.params, before)
    assert int(micro.step) == 2 * k and int(full.step) == 2
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), micro.params, full.params)


# ----------------------------------- the caller's schedules, decay masks and transformations


def _zero_gradient_step(tx, params):
    """Params after one update with zero gradients: Adam's step is then 0, only weight decay acts."""
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    return optax.apply_updates(params, updates)


@pytest.mark.parametrize("name", ["adamw", "paper"])
def test_an_optax_schedule_as_learning_rate_drives_the_updates(name):
    """With a constant gradient Adam's update is -lr(t) · g / (|g| + ε), i.e. -lr(t) · sign(g):
    the params follow the caller's schedule, not warmup + cosine or Noam."""
    sched = optax.piecewise_constant_schedule(0.1, {1: 0.5, 2: 3.0})  # 0.1, 0.05, 0.15, 0.15
    tx, lr = tr.make_optimizer(name, learning_rate=sched)  # no total_steps / d_model needed
    params, g = {"w": jnp.zeros(2)}, {"w": jnp.asarray([2.0, -3.0])}
    opt_state, want = tx.init(params), np.zeros(2)
    for t in range(4):
        updates, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        want -= float(sched(t)) * np.array([1.0, -1.0])
        np.testing.assert_allclose(params["w"], want, rtol=1e-6)
        assert float(lr(t)) == pytest.approx(float(sched(t)))
    # The logged rate follows the optimizer's updates under accumulation too.
    _, lr = tr.make_optimizer(name, learning_rate=sched, accumulate_steps=2)
    assert [float(lr(step)) for step in range(6)] == pytest.approx([float(sched(t)) for t in (0, 0, 1, 1, 2, 2)])
    with pytest.raises(ValueError, match="learning_rate must be a number or an optax schedule.*'fast'"):
        tr.make_optimizer(name, learning_rate="fast", total_steps=10, d_model=16)


def test_a_callers_decay_mask_replaces_the_rule():
    params = {"a": {"kernel": jnp.full((2, 2), 2.0)}, "b": {"kernel": jnp.full((2, 2), 2.0)},
              "norm": {"scale": jnp.ones(2)}}
    lr, wd = 0.1, 0.5
    kw = dict(learning_rate=lr, warmup_steps=0, total_steps=10, weight_decay=wd)
    as_tree = {"a": {"kernel": True}, "b": {"kernel": False}, "norm": {"scale": True}}

    def only_vectors(p):
        return jax.tree.map(lambda x: x.ndim == 1, p)

    # b's kernel, which the default rule decays, is left alone; the norm scale, which it spares, shrinks.
    for decay, decayed in ((as_tree, {"a", "norm"}), (only_vectors, {"norm"}), ("kernels", {"a", "b"})):
        tx, _ = tr.make_optimizer("adamw", decay=decay, **kw)
        new = _zero_gradient_step(tx, params)
        for group, leaves in params.items():
            for leaf, value in leaves.items():
                want = value * (1 - lr * wd) if group in decayed else value
                np.testing.assert_allclose(new[group][leaf], want, rtol=1e-6, err_msg=f"{decay} {group}")
    for bad in (None, {"a": 1.0}, {"a": {"kernel": "yes"}}):
        with pytest.raises(ValueError, match="decay must be one of .*pytree of bools"):
            tr.make_optimizer("adamw", decay=bad, **kw)


def test_a_callers_gradient_transformation_is_clipped_accumulated_and_logged():
    params, g = jnp.zeros(2), jnp.asarray([3.0, 4.0])  # ‖g‖ = 5
    tx, lr = tr.make_optimizer(optax.sgd(0.5), clip_norm=1.0)
    assert lr is None  # nothing to log without schedule=
    updates, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(updates, -0.5 * g / 5, rtol=1e-6)  # clipped to norm 1, then SGD
    sched = optax.linear_schedule(1.0, 0.0, 10)
    tx, lr = tr.make_optimizer(optax.sgd(0.5), accumulate_steps=2, schedule=sched)
    opt_state = tx.init(params)
    first, opt_state = tx.update(g, opt_state, params)
    second, _ = tx.update(3 * g, opt_state, params)
    np.testing.assert_array_equal(first, 0.0)
    np.testing.assert_allclose(second, -0.5 * 2 * g, rtol=1e-6)  # the mean of the two gradients
    assert float(lr(5)) == pytest.approx(float(sched(2)))
    assert float(tr.make_optimizer(optax.sgd(0.5), schedule=0.5)[1](7)) == 0.5
    # make_train_step runs it: one SGD step on the least-squares loss.
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32), "y": jnp.asarray(rng.normal(size=(8, 3)))}
    model = {"dense": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "bias": jnp.zeros(3)}}
    grads = jax.grad(lambda p: _least_squares_loss(p, {}, batch)[0])(model)
    tx, lr = tr.make_optimizer(optax.sgd(0.5))
    state, metrics = tr.make_train_step(_least_squares_loss, tx, learning_rate=lr)(
        tr.TrainState.create(copy(model), tx, jax.random.key(0)), batch)
    jax.tree.map(lambda new, p, d: np.testing.assert_allclose(new, p - 0.5 * d, rtol=1e-5, atol=1e-6),
                 state.params, model, grads)
    assert "learning_rate" not in metrics
    with pytest.raises(ValueError, match="learning_rate=0.1.*GradientTransformation"):
        tr.make_optimizer(optax.sgd(0.5), learning_rate=0.1)
    with pytest.raises(ValueError, match="weight_decay=0.1"):
        tr.make_optimizer(optax.sgd(0.5), weight_decay=0.1)
    with pytest.raises(ValueError, match="schedule must be .*got 'x'"):
        tr.make_optimizer(optax.sgd(0.5), schedule="x")
    with pytest.raises(ValueError, match="schedule=.*pass the schedule as learning_rate"):
        tr.make_optimizer("adamw", learning_rate=0.1, total_steps=10, schedule=sched)
    with pytest.raises(ValueError, match="unknown optimizer <function sgd.*GradientTransformation"):
        tr.make_optimizer(optax.sgd, learning_rate=0.1)  # the factory, not a transformation


# ------------------------------------------------------------ model losses


def test_lm_loss_label_smoothing_padding_and_metrics():
    state, _, _ = lm_state()
    batch = lm_batch()
    loss, (m, new_ms) = lm_loss(state.params, {}, batch, cfg=CFG, label_smoothing=0.1, train=False)
    logits, _ = lm_apply(state.params, batch["inputs"], cfg=CFG)
    w = batch["targets"] != 0
    want, total = tr.cross_entropy(logits, batch["targets"], weights=w, label_smoothing=0.1)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    np.testing.assert_allclose(float(m["nll"]), float(tr.cross_entropy(logits, batch["targets"], weights=w)[0]),
                               rtol=1e-6)
    assert float(m["nll"]) != float(m["loss"])
    assert float(m["weight"]) == float(total) == int(w.sum()) < w.size
    np.testing.assert_allclose(float(m["accuracy"]), float(tr.token_accuracy(logits, batch["targets"], w)))
    assert new_ms == {}
    # Without a key (or with train=False) there is no dropout; with a key there is.
    again = lm_loss(state.params, {}, batch, jax.random.key(3), cfg=CFG, label_smoothing=0.1, train=False)
    assert float(again[0]) == float(loss)
    dropped = lm_loss(state.params, {}, batch, jax.random.key(3), cfg=CFG, label_smoothing=0.1)
    assert float(dropped[0]) != float(loss)


def test_seq2seq_loss_matches_manual():
    cfg = CFG.replace(dropout_rate=0.0)
    params = jax.jit(jf.init_seq2seq, static_argnums=1)(jax.random.key(0), cfg)
    batch = {"src": jnp.array([[5, 6, 7, 0], [3, 4, 0, 0]]), "tgt_in": jnp.array([[1, 7, 6, 5], [1, 4, 3, 0]]),
             "tgt_out": jnp.array([[7, 6, 5, 2], [4, 3, 2, 0]])}
    (loss, (m, _)), logits = jax.jit(lambda p, b: (
        tr.seq2seq_loss(p, {}, b, cfg=cfg, label_smoothing=0.1),
        jf.seq2seq_apply(p, b["src"], b["tgt_in"], cfg=cfg)[0]))(params, batch)
    want, total = tr.cross_entropy(logits, batch["tgt_out"], weights=batch["tgt_out"] != 0, label_smoothing=0.1)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    assert float(m["weight"]) == float(total) == 7


# ----------------------------------------------------------- train / eval steps


def test_train_step_decreases_the_loss():
    state, tx, _ = lm_state(CFG.replace(dropout_rate=0.0))
    step = tr.make_train_step(functools.partial(tr.lm_loss, cfg=CFG.replace(dropout_rate=0.0)), tx)
    batch, losses = lm_batch(), []
    for _ in range(20):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
        assert np.isfinite(float(m["grad_norm"])) and float(m["grad_norm"]) > 0
    assert int(state.step) == 20
    assert losses[-1] < 0.5 * losses[0], losses


def test_bfloat16_mixed_precision_trains_like_float32():
    """The same 30 AdamW steps in float32 and in bf16 compute: the loss curves stay within 2%."""
    cfg = CFG.replace(dropout_rate=0.0)
    curves = {}
    for dtype in ("float32", "bfloat16"):
        state, tx, _ = lm_state(cfg)
        exe = ExecConfig(attention_impl="blockwise", compute_dtype=dtype)
        step = tr.make_train_step(functools.partial(tr.lm_loss, cfg=cfg, exe=exe), tx)
        curves[dtype] = []
        for i in range(30):
            state, m = step(state, lm_batch(seed=i % 4))
            curves[dtype].append(float(m["loss"]))
    f32, bf16 = np.array(curves["float32"]), np.array(curves["bfloat16"])
    assert f32[-1] < 0.6 * f32[0]
    np.testing.assert_allclose(bf16, f32, rtol=0.02)


def test_train_step_is_deterministic_and_dropout_key_follows_the_step():
    state, tx, lr = lm_state()
    loss_fn = functools.partial(tr.lm_loss, cfg=CFG)
    step = tr.make_train_step(loss_fn, tx, learning_rate=lr)
    batch = lm_batch()
    s1, m1 = step(copy(state), batch)
    s2, m2 = step(copy(state), batch)
    jax.tree.map(np.testing.assert_array_equal, jax.random.key_data(s1.key), jax.random.key_data(s2.key))
    jax.tree.map(np.testing.assert_array_equal, (s1.params, s1.opt_state, m1), (s2.params, s2.opt_state, m2))
    # The dropout key is fold_in(key, step): the loss of step 0 is the loss under that key...
    want = lm_loss(state.params, {}, batch, jax.random.fold_in(state.key, 0), cfg=CFG)[0]
    np.testing.assert_allclose(float(m1["loss"]), float(want), rtol=1e-6)
    # ...and the same params at another step see other dropout masks.
    _, m3 = step(copy(state).replace(step=jnp.int32(1)), batch)
    assert float(m3["loss"]) != float(m1["loss"])
    np.testing.assert_allclose(float(m3["learning_rate"]), float(lr(1)), rtol=1e-6)


def test_eval_step_sums_over_half_batches_equal_the_full_batch():
    state, _, _ = lm_state()
    eval_step = tr.make_eval_step(functools.partial(tr.lm_loss, cfg=CFG, label_smoothing=0.1))
    batch = lm_batch(B=6)
    full = eval_step(state, batch)
    halves = [eval_step(state, jax.tree.map(lambda a: a[s], batch)) for s in (slice(0, 3), slice(3, 6))]
    total = jax.tree.map(jnp.add, *halves)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), total, full)
    assert float(full["weight"]) == int((batch["targets"] != 0).sum())
    summary = tr.eval_summary(total)
    _, (m, _) = lm_loss(state.params, {}, batch, cfg=CFG, label_smoothing=0.1, train=False)
    for name in ("loss", "nll", "accuracy"):
        np.testing.assert_allclose(float(summary[name]), float(m[name]), rtol=1e-6)
    np.testing.assert_allclose(float(summary["perplexity"]), np.exp(float(m["nll"])), rtol=1e-6)
    # No dropout in eval: a state with another key gives the same sums.
    again = eval_step(state.replace(key=jax.random.key(99)), batch)
    jax.tree.map(np.testing.assert_array_equal, again, full)


def test_batch_norm_statistics_are_threaded_through_the_steps():
    cfg = CFG.replace(norm="batch")
    state, tx, _ = lm_state(cfg)
    loss_fn = functools.partial(tr.lm_loss, cfg=cfg)
    step, eval_step = tr.make_train_step(loss_fn, tx), tr.make_eval_step(loss_fn)
    before = copy(state.model_state)
    state, _ = step(state, lm_batch())
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), state.model_state, before)
    assert all(jax.tree.leaves(changed))
    sums = eval_step(state, lm_batch())  # uses the running statistics, does not update them
    assert np.isfinite(float(sums["loss_sum"]))


# ------------------------------------------------- optional accuracy, grad_norm, dropout


def test_accuracy_false_leaves_out_only_the_accuracy_metrics():
    state, _, _ = lm_state()
    batch = lm_batch()
    kw = dict(cfg=CFG, label_smoothing=0.1, train=False)
    loss, (m, _) = lm_loss(state.params, {}, batch, **kw)
    loss_na, (m_na, _) = lm_loss(state.params, {}, batch, accuracy=False, **kw)
    assert float(loss_na) == float(loss)
    assert set(m_na) == {"loss", "nll", "weight"} and set(m) == set(m_na) | {"correct", "accuracy"}
    for name in m_na:
        assert float(m_na[name]) == float(m[name]), name
    # The accuracy's row max over [B, T, V] is not computed at all.
    def maxima(accuracy):
        jaxpr = jax.make_jaxpr(functools.partial(tr.lm_loss, accuracy=accuracy, **kw))(state.params, {}, batch)
        return str(jaxpr).count("reduce_max")
    assert maxima(False) < maxima(True)
    # Eval sums and their summary cope without it.
    sums = tr.make_eval_step(functools.partial(tr.lm_loss, cfg=CFG, label_smoothing=0.1, accuracy=False))(state, batch)
    assert set(sums) == {"loss_sum", "nll_sum", "weight"}
    summary = tr.eval_summary(sums)
    assert "accuracy" not in summary
    for name in ("loss", "nll"):
        np.testing.assert_allclose(float(summary[name]), float(m[name]), rtol=1e-6)


def _token_loss_fn(accuracy):
    """A model-free token loss in the loss_fn protocol: logits = x @ w, through training's token metrics."""
    def loss_fn(params, model_state, batch, key=None, train=True, axis_name=None):
        loss, metrics = tr._token_loss(batch["x"] @ params["w"], batch["targets"], 0, 0.1, accuracy)
        return loss, (metrics, model_state)
    return loss_fn


@pytest.mark.parametrize("accuracy", [True, False])
def test_whole_batch_metrics_with_and_without_accuracy(accuracy):
    """Over a device axis (vmap stands in for pmap) the metrics are the whole batch's, accuracy or not."""
    rng = np.random.default_rng(0)
    targets = rng.integers(1, 7, size=(4, 5))
    targets[0, 2:] = targets[3, 1:] = 0  # padding: the shards score different token counts
    batch = {"x": jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32), "targets": jnp.asarray(targets, jnp.int32)}
    tx, _ = tr.make_optimizer("adamw", learning_rate=0.1, warmup_steps=0, total_steps=10)
    state = tr.TrainState.create({"w": jnp.asarray(rng.normal(size=(3, 7)), jnp.float32)}, tx, jax.random.key(0))
    one = tr.train_step_fn(_token_loss_fn(accuracy), tx)
    sharded = jax.vmap(tr.train_step_fn(_token_loss_fn(accuracy), tx, axis_name="d"), in_axes=(None, 0),
                       axis_name="d")
    want_state, want = one(state, batch)
    got_state, got = sharded(state, jax.tree.map(lambda a: a.reshape(2, 2, *a.shape[1:]), batch))
    assert set(got) == set(want) and ("accuracy" in want) == accuracy and ("correct" in want) == accuracy
    for name in want:
        np.testing.assert_allclose(got[name], np.broadcast_to(want[name], (2,)), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(got_state.params["w"][1], want_state.params["w"], rtol=1e-5, atol=1e-7)


def test_grad_norm_false_leaves_it_out_and_changes_nothing_else():
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32), "y": jnp.asarray(rng.normal(size=(8, 3)))}
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "bias": jnp.zeros(3)}}
    tx, lr = tr.make_optimizer("adamw", learning_rate=0.05, warmup_steps=0, total_steps=10)
    state = tr.TrainState.create(params, tx, jax.random.key(0))
    s1, m1 = tr.make_train_step(_least_squares_loss, tx, learning_rate=lr)(copy(state), batch)
    s2, m2 = tr.make_train_step(_least_squares_loss, tx, learning_rate=lr, grad_norm=False)(copy(state), batch)
    grads = jax.grad(lambda p: _least_squares_loss(p, {}, batch)[0])(params)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(optax.tree.norm(grads)), rtol=1e-6)
    assert set(m2) == set(m1) - {"grad_norm"} == {"loss", "learning_rate"}
    jax.tree.map(np.testing.assert_array_equal, (s2.params, s2.opt_state, m2["loss"]),
                 (s1.params, s1.opt_state, m1["loss"]))


def test_dropout_false_passes_no_key_and_is_deterministic():
    seen = []  # the key each trace of the loss received

    def loss_fn(params, model_state, batch, key=None, train=True):
        seen.append(key)
        x = batch["x"]
        if key is not None:  # inverted dropout on the inputs
            x = x * jax.random.bernoulli(key, 0.5, x.shape) / 0.5
        return _least_squares_loss(params, model_state, {**batch, "x": x})

    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32), "y": jnp.asarray(rng.normal(size=(8, 3)))}
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "bias": jnp.zeros(3)}}
    tx, _ = tr.make_optimizer("adamw", learning_rate=0.05, warmup_steps=0, total_steps=10)
    state = tr.TrainState.create(params, tx, jax.random.key(0))
    no_dropout = tr.make_train_step(loss_fn, tx, dropout=False)
    s1, m1 = no_dropout(copy(state), batch)
    assert len(seen) == 1 and seen[0] is None
    # Neither the step number nor the state's key matters...
    s2, m2 = no_dropout(copy(state).replace(step=jnp.int32(5), key=jax.random.key(9)), batch)
    jax.tree.map(np.testing.assert_array_equal, (s2.params, m2), (s1.params, m1))
    # ...and it is the default step on a loss that is given key=None.
    s3, m3 = tr.make_train_step(lambda p, ms, b, key, **kw: loss_fn(p, ms, b, None, **kw), tx)(copy(state), batch)
    jax.tree.map(np.testing.assert_array_equal, (s3.params, s3.opt_state, m3), (s1.params, s1.opt_state, m1))
    # The default step does draw dropout masks.
    _, m4 = tr.make_train_step(loss_fn, tx)(copy(state), batch)
    assert seen[-1] is not None and float(m4["loss"]) != float(m1["loss"])
