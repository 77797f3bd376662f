"""jformer.ensemble: S models in one vmapped program equal S separate runs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jformer as jf
from jformer import ensemble as ens_lib
from jformer import training as tr
from jformer import parallel
from jformer.checkpoint import Checkpointer

# No biases: the attention key bias has an exactly-zero gradient (softmax ignores a shift shared
# by all keys), so Adam turns its rounding noise (~1e-9, different under vmap) into full-size
# updates and no two programs agree on it.
CFG = jf.TransformerConfig(vocab_size=13, d_model=16, num_heads=2, num_layers=1, d_ff=32, dropout_rate=0.1,
                           max_len=12, use_bias=False)
TOTAL = 20
LRS, WARMUPS, SMOOTHING = [3e-3, 1e-2, 3e-2], [0, 2, 5], [0.0, 0.1, 0.2]
loss_fn = functools.partial(tr.lm_loss, cfg=CFG)


def optimizer(hp):
    return tr.make_optimizer("adamw", learning_rate=hp["lr"], warmup_steps=hp["warmup"], total_steps=TOTAL,
                             weight_decay=0.01)


def batches(n, S=None, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, 4, 9) if S is None else (n, S, 4, 9)
    tokens = rng.integers(0, CFG.vocab_size, size=shape)
    return [{"inputs": jnp.asarray(t[..., :-1], jnp.int32), "targets": jnp.asarray(t[..., 1:], jnp.int32)}
            for t in tokens]


KEYS = jax.random.split(jax.random.key(7), 3)
HPARAMS = {"lr": LRS, "warmup": WARMUPS, "label_smoothing": SMOOTHING}
init_lm = jax.jit(jf.init_lm, static_argnums=1)


@functools.cache
def _fresh():
    return ens_lib.create(lambda k: jf.init_lm(k, CFG), optimizer, KEYS, hparams=HPARAMS)


def make():
    """A fresh 3-member ensemble (a copy: train steps donate theirs) and its keys."""
    return jax.tree.map(jnp.copy, _fresh()), KEYS


@functools.cache
def ensemble_step(batch_axis=None):
    return ens_lib.make_train_step(loss_fn, optimizer, loss_hparams=("label_smoothing",), batch_axis=batch_axis)


@functools.cache
def single_step(i):
    tx, lr = optimizer({"lr": LRS[i], "warmup": WARMUPS[i]})
    return tx, tr.make_train_step(functools.partial(loss_fn, label_smoothing=SMOOTHING[i]), tx, learning_rate=lr)


def separate_run(key, i, data, member_batch=False):
    """Member i trained alone: concrete hyper-parameters, its own jit."""
    init_key, train_key = jax.random.split(key)
    tx, step = single_step(i)
    state = tr.TrainState.create(init_lm(init_key, CFG), tx, train_key)
    losses = []
    for batch in data:
        state, m = step(state, jax.tree.map(lambda x: x[i], batch) if member_batch else batch)
        losses.append(float(m["loss"]))
    return state, losses


@pytest.mark.parametrize("member_batch", [False, True])
def test_ensemble_step_equals_loop_over_members(member_batch):
    """Params, losses and learning rates of each member equal a separate run with that member's
    keys and (concrete) hyper-parameters: per-member lr, warmup and label smoothing, dropout on."""
    ens, keys = make()
    step = ensemble_step(0 if member_batch else None)
    data = batches(4, S=3 if member_batch else None)
    losses, lrs = [], []
    for batch in data:
        ens, m = step(ens, batch)
        losses.append(np.asarray(m["loss"]))
        lrs.append(np.asarray(m["learning_rate"]))
    assert ens.state.step.tolist() == [4, 4, 4]
    for i in range(3):
        state, ref_losses = separate_run(keys[i], i, data, member_batch)
        np.testing.assert_allclose(np.asarray(losses)[:, i], ref_losses, rtol=0, atol=1e-6)
        got = ens_lib.member(ens, i).params
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state.params)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # the traced warmup-cosine schedule gives each member its own rate, from 0 when it warms up
    np.testing.assert_allclose(np.asarray(lrs)[0], [LRS[0], 0.0, 0.0], atol=1e-9)
    assert len({round(float(x), 9) for x in np.asarray(lrs)[-1]}) == 3


def test_eval_step_per_member():
    ens, keys = make()
    evaluate = ens_lib.make_eval_step(loss_fn)
    batch = batches(1)[0]
    sums = evaluate(ens, batch)
    for i in range(3):
        ref = tr.make_eval_step(loss_fn)(ens_lib.member(ens, i), batch)
        for name in ref:
            np.testing.assert_allclose(sums[name][i], ref[name], rtol=1e-6)
    summary = tr.eval_summary(sums)
    assert summary["loss"].shape == (3,) and np.all(np.isfinite(summary["perplexity"]))


def test_member_decodes_like_a_separately_trained_model():
    ens, keys = make()
    step = ensemble_step()
    data = batches(4)
    for batch in data:
        ens, _ = step(ens, batch)
    prompt = data[0]["inputs"][:, :3]
    for i in (0, 2):
        alone, _ = separate_run(keys[i], i, data)
        got = jf.decoding.generate_lm(ens_lib.member(ens, i).params, prompt, cfg=CFG, max_new_tokens=6)
        want = jf.decoding.generate_lm(alone.params, prompt, cfg=CFG, max_new_tokens=6)
        np.testing.assert_array_equal(got, want)


def test_save_restore_resume_is_exact(tmp_path):
    """Interrupt after 3 steps (checkpoint, drop everything), resume into a fresh template:
    steps 4-6 equal an uninterrupted run's."""
    step = ensemble_step()
    data = batches(6)
    ens, _ = make()
    for batch in data[:3]:
        ens, _ = step(ens, batch)
    with Checkpointer(tmp_path / "ck") as ckpt:
        ckpt.save(3, ens.state)
    del ens
    template, _ = make()
    with Checkpointer(tmp_path / "ck") as ckpt:
        state, _, at = ckpt.restore(template.state)
    resumed = template.replace(state=state)
    assert at == 3
    uninterrupted, _ = make()
    for i, batch in enumerate(data):
        uninterrupted, m_ref = step(uninterrupted, batch)
        if i >= 3:
            resumed, m = step(resumed, batch)
            np.testing.assert_array_equal(m["loss"], m_ref["loss"])
    for a, b in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(uninterrupted.state.params)):
        np.testing.assert_array_equal(a, b)


def test_members_sharded_over_a_mesh_equal_unsharded():
    mesh = parallel.make_mesh({"data": 3}, jax.devices()[:3])
    ens, _ = make()
    sharded = ens_lib.shard_members(make()[0], mesh)
    leaf = sharded.state.params["embed"]["token"]["embedding"]
    assert len({s.device for s in leaf.addressable_shards}) == 3
    assert leaf.addressable_shards[0].data.shape[0] == 1
    step = ensemble_step()
    for batch in batches(2):
        ens, m = step(ens, batch)
        sharded, m_sharded = step(sharded, batch)
        np.testing.assert_allclose(m_sharded["loss"], m["loss"], rtol=1e-6)
    assert sharded.state.params["embed"]["token"]["embedding"].sharding.spec[0] == "data"
    with pytest.raises(ValueError, match="do not split evenly"):
        ens_lib.shard_members(ens, parallel.make_mesh({"data": 2}, jax.devices()[:2]))


def test_stack_member_round_trip():
    ens, _ = make()
    again = ens_lib.stack([ens_lib.member(ens, i) for i in range(3)], ens.hparams)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(ens)):
        np.testing.assert_array_equal(jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a,
                                      jax.random.key_data(b) if jnp.issubdtype(b.dtype, jax.dtypes.prng_key) else b)


@pytest.mark.parametrize("warmup,total,end", [(0, 10, 0.0), (3, 10, 1e-4), (9, 10, 0.0)])
def test_warmup_cosine_matches_optax(warmup, total, end):
    ours = tr.make_schedule("adamw", learning_rate=0.1, warmup_steps=warmup, total_steps=total,
                            min_learning_rate=end)
    ref = optax.warmup_cosine_decay_schedule(0.0, 0.1, warmup, total, end_value=end)
    for n in range(total + 3):
        np.testing.assert_allclose(float(ours(n)), float(ref(n)), rtol=1e-6, atol=1e-9, err_msg=f"step {n}")


def test_bad_input_errors():
    keys = jax.random.split(jax.random.key(0), 3)
    init = functools.partial(jf.init_lm, cfg=CFG)
    with pytest.raises(ValueError, match=r"hparams\['lr'\].*\(3,\).*\(2,\)"):
        ens_lib.create(lambda k: init(k), optax.sgd(0.1), keys, hparams={"lr": [1.0, 2.0]})
    with pytest.raises(ValueError, match="keys must be"):
        ens_lib.create(lambda k: init(k), optax.sgd(0.1), jax.random.split(jax.random.key(0), (2, 2)))
    with pytest.raises(ValueError, match="batch_axis"):
        ens_lib.make_train_step(loss_fn, optax.sgd(0.1), batch_axis=1)
    ens, _ = make()
    with pytest.raises(IndexError, match="member 3 out of range for an ensemble of 3"):
        ens_lib.member(ens, 3)
    with pytest.raises(ValueError, match=r"loss_hparams \['smooth'\]"):
        ens_lib.make_train_step(loss_fn, optax.sgd(0.1), loss_hparams=("smooth",))(ens, batches(1)[0])
    with pytest.raises(ValueError, match=r"batch_axis=0 needs batch\['inputs'\] of shape \[S=3"):
        ens_lib.make_train_step(loss_fn, optax.sgd(0.1), batch_axis=0)(ens, batches(1)[0])
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        tr.make_schedule("adamw", learning_rate=0.1, warmup_steps=10, total_steps=10)
