"""jformer.parallel on 8 CPU devices (tests/conftest.py): every strategy gives one device's numbers.

Equivalence models have no biases: an attention *key* bias has an exactly zero
gradient (it adds q·b_k to every score of a row, which softmax ignores), so its
computed gradient is rounding noise, and Adam's normalisation turns any noise,
one device's or eight's, into a full-size step. Everything else is compared.
"""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jformer as jf
from jformer import parallel
from jformer import training as tr
from jformer.checkpoint import Checkpointer

STEPS = 3
TOL = 1e-5

LM = jf.TransformerConfig(vocab_size=64, d_model=32, num_heads=8, num_layers=2, d_ff=64, dropout_rate=0.0,
                          norm_position="pre", positions="learned", max_len=16, use_bias=False, pad_id=None,
                          activation="gelu")
S2S = jf.TransformerConfig(vocab_size=48, d_model=32, num_heads=8, num_layers=2, d_ff=64, dropout_rate=0.0,
                           max_len=16, use_bias=False, pad_id=0)


@pytest.fixture(autouse=True, scope="module")
def eight_devices():
    assert jax.device_count() == 8, "tests/conftest.py should give 8 CPU devices"


def lm_batches(n=STEPS, B=16, T=16, seed=0):
    """Counting sequences from random starts: learnable, so the loss visibly falls."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = ((rng.integers(0, LM.vocab_size, (B, 1)) + np.arange(T + 1)) % LM.vocab_size).astype(np.int32)
        out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    return out


def s2s_batches(n=STEPS, B=16, S=12, T=10, seed=0):
    """Padded batches whose rows hold very different token counts, so devices see unequal
    shares of the loss (a plain mean of per-device means would be wrong)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        src = rng.integers(4, S2S.vocab_size, (B, S)).astype(np.int32)
        tgt = rng.integers(4, S2S.vocab_size, (B, T + 1)).astype(np.int32)
        for b in range(B):
            src[b, rng.integers(2, S + 1):] = 0
            tgt[b, 1 + (b * 7) % T:] = 0
        tgt[:, 0] = 1
        out.append({"src": src, "tgt_in": tgt[:, :-1], "tgt_out": tgt[:, 1:]})
    return out


@functools.cache
def setup(kind, cfg=None):
    """(cfg, loss_fn, tx, create_state, batches) of the LM or the encoder-decoder."""
    cfg = cfg or (LM if kind == "lm" else S2S)
    init = jf.init_lm if kind == "lm" else jf.init_seq2seq
    loss = tr.lm_loss if kind == "lm" else tr.seq2seq_loss
    if cfg.norm == "batch":
        # A Post-LN encoder's last BatchNorm bias shifts every memory vector alike; the decoder's
        # next BatchNorm subtracts that shift again, so its gradient is exactly zero (as for a key
        # bias, above). Plain SGD keeps rounding noise in such gradients at noise size.
        tx = optax.sgd(0.1)
    else:
        tx, _ = tr.make_optimizer("adamw", learning_rate=1e-2, warmup_steps=1, total_steps=20,
                                  weight_decay=0.1, clip_norm=1.0)

    @functools.cache
    def create():
        params = jax.jit(init, static_argnums=1)(jax.random.key(0), cfg)
        return tr.TrainState.create(params, tx, jax.random.key(1), jf.init_state(params, cfg))

    return cfg, functools.partial(loss, cfg=cfg), tx, create, tuple(lm_batches() if kind == "lm" else s2s_batches())


def copy(tree):
    """A fresh copy: train steps donate their state."""
    return jax.tree.map(jnp.copy, tree)


def run_single(loss_fn, tx, create, batches):
    step = tr.make_train_step(loss_fn, tx)
    state, losses = copy(create()), []
    for b in batches:
        state, m = step(state, b)
        losses.append(float(m["loss"]))
    return state, losses


@functools.cache
def reference(kind, cfg=None):
    """The one-device run that every strategy is compared with (computed once per model)."""
    _, loss_fn, tx, create, batches = setup(kind, cfg)
    return run_single(loss_fn, tx, create, batches)


def run_mesh(loss_fn, tx, create, batches, spec, devices=None):
    # Placing one initial state on each mesh, rather than compiling an init per mesh
    # (parallel.init_sharded, tested once below), keeps the suite fast.
    mesh = parallel.make_mesh(spec, devices)
    state, shardings = parallel.shard_state(copy(create()), mesh)
    step = parallel.make_sharded_train_step(loss_fn, tx, mesh, shardings)
    losses = []
    for b in batches:
        state, m = step(state, parallel.shard_batch(b, mesh))
        losses.append(float(m["loss"]))
    return state, losses


def assert_same(state, losses, ref_state, ref_losses):
    np.testing.assert_allclose(losses, ref_losses, atol=TOL, rtol=0)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path((state.params, state.model_state)),
                            jax.tree.leaves((ref_state.params, ref_state.model_state))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


def run_pmap(loss_fn, tx, create, batches):
    step = parallel.make_pmap_train_step(loss_fn, tx)
    state, losses = parallel.replicate(create()), []
    for b in batches:
        state, m = step(state, parallel.split_batch(b, 8))
        losses.append(float(m["loss"][0]))
    return parallel.unreplicate(state), losses


def _slow(spec):
    return pytest.param(spec, marks=pytest.mark.slow)


# The whole matrix trains 10 models; the quick tier (-m "not slow") keeps the 2-D mesh, and
# pmap and fsdp stay covered there by the BatchNorm and init_sharded tests below.
@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
@pytest.mark.parametrize("spec", [_slow("data=8"), _slow("fsdp=8"), _slow("model=8"), "data=4,model=2", _slow("pmap")])
def test_every_strategy_equals_one_device(kind, spec):
    _, loss_fn, tx, create, batches = setup(kind)
    ref_state, ref_losses = reference(kind)
    assert ref_losses[-1] < ref_losses[0]
    if spec == "pmap":
        assert_same(*run_pmap(loss_fn, tx, create, batches), ref_state, ref_losses)
        return
    state, losses = run_mesh(loss_fn, tx, create, batches, spec)
    assert_same(state, losses, ref_state, ref_losses)
    # The strategy really is what it says: a matrix is split over every axis but "data".
    kernel = state.params["decoder" if kind == "lm" else "encoder"]["layers"]["ffn"]["wi"]["kernel"]
    assert kernel.addressable_shards[0].data.size == kernel.size // (8 // parallel.parse_mesh_spec(spec)["data"])


def test_pmap_batch_norm_statistics_are_synchronised():
    """BatchNorm under pmap: the step passes its device axis to the loss (the model config holds
    no device axis), so batch statistics (and the running ones) are the whole batch's. A loss
    that drops the axis normalises each device by its own shard, and the numbers differ."""
    bn = S2S.replace(norm="batch")
    _, loss_fn, tx, create, batches = setup("seq2seq", bn)
    ref_state, ref_losses = reference("seq2seq", bn)
    assert_same(*run_pmap(loss_fn, tx, create, batches), ref_state, ref_losses)

    def unsynced_loss(*args, axis_name=None):
        return loss_fn(*args)

    _, unsynced = run_pmap(unsynced_loss, tx, create, batches[:1])
    assert abs(unsynced[0] - ref_losses[0]) > 1e-4
    # Sharded jit needs no axis name: the batch is one global array.
    assert_same(*run_mesh(loss_fn, tx, create, batches, "fsdp=4,model=2"), ref_state, ref_losses)


def test_init_sharded_creates_the_same_state_in_shards():
    _, _, _, create, _ = setup("lm")
    state, shardings = parallel.init_sharded(create.__wrapped__, parallel.make_mesh("fsdp=4,model=2"))
    wq = state.params["decoder"]["layers"]["self_attn"]["query"]["kernel"]  # [L, D, N, H]
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "model", None)
    assert wq.addressable_shards[0].data.shape == (2, 8, 4, 4)
    assert_same(state, [], create(), [])


def test_rules_and_mesh_errors():
    mesh = parallel.make_mesh("fsdp=-1,model=2")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "model": 2}
    assert parallel.logical_axes("decoder/layers/self_attn/query/kernel", 4) == ("layers", "embed", "heads",
                                                                                  "head_dim")
    # 2 key/value heads cannot split over model=4: that dimension stays whole.
    mesh = parallel.make_mesh("fsdp=2,model=4")
    spec = parallel.partition_spec(("embed", "heads", "head_dim"), (32, 2, 4), mesh)
    assert spec == jax.sharding.PartitionSpec("fsdp", None, None)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        parallel.make_mesh("dp=8")
    with pytest.raises(ValueError, match="has 6 devices, but 8"):
        parallel.make_mesh("data=3,model=2")
    with pytest.raises(ValueError, match="does not split over 8"):
        parallel.shard_batch({"inputs": np.zeros((12, 4), np.int32)}, parallel.make_mesh("data=8"))


def test_checkpoint_saved_on_8_devices_restores_on_4_and_1(tmp_path):
    """Train on fsdp=8 and save after step 2; restore on data=2,model=2 (4 devices) and on
    1 device: the next steps' losses equal those of the 8-device run that never stopped."""
    _, loss_fn, tx, create, _ = setup("lm")
    batches = lm_batches(n=4)
    mesh = parallel.make_mesh("fsdp=8")
    state, shardings = parallel.shard_state(copy(create()), mesh)
    step = parallel.make_sharded_train_step(loss_fn, tx, mesh, shardings)
    losses = []
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        for i, b in enumerate(batches):
            state, m = step(state, parallel.shard_batch(b, mesh))
            losses.append(float(m["loss"]))
            if i == 1:
                ckpt.save(2, state)  # copied to host before returning: the state may be donated next

    for spec, devices in (("data=2,model=2", jax.devices()[:4]), ("data=1", jax.devices()[:1])):
        mesh = parallel.make_mesh(spec, devices)
        template, shardings = parallel.shard_state(copy(create()), mesh)
        with Checkpointer(tmp_path / "ckpt") as ckpt:
            restored, _, saved_step = ckpt.restore(template)
        assert saved_step == 2 and int(restored.step) == 2
        kernel = restored.params["decoder"]["layers"]["ffn"]["wi"]["kernel"]
        assert kernel.sharding == shardings.params["decoder"]["layers"]["ffn"]["wi"]["kernel"]
        train = parallel.make_sharded_train_step(loss_fn, tx, mesh, shardings)
        resumed = []
        for b in batches[2:]:
            restored, m = train(restored, parallel.shard_batch(b, mesh))
            resumed.append(float(m["loss"]))
        np.testing.assert_allclose(resumed, losses[2:], atol=TOL, rtol=0)


def test_fsdp_divides_parameter_and_optimizer_memory_of_a_billion_parameter_model():
    """The ~1B-parameter LM of benchmarks/memory.py, compiled ahead of time for 8 devices
    (nothing is allocated): FSDP's per-device arguments (params + Adam state) are ~1/8 of DP's."""
    from benchmarks import memory

    dp, fsdp = memory.memory_table(meshes=("data=8", "fsdp=8"), batch_size=8, seq_len=128)
    assert 0.9e9 < dp["parameters"] < 1.1e9
    assert dp["params_gib"] / fsdp["params_gib"] == pytest.approx(8, rel=0.01)
    assert dp["opt_state_gib"] / fsdp["opt_state_gib"] == pytest.approx(8, rel=0.01)
    # XLA's own plan agrees: the compiled step's arguments shrink ~8x too.
    assert dp["arguments_gib"] / fsdp["arguments_gib"] == pytest.approx(8, rel=0.05)
    assert fsdp["total_gib"] < dp["total_gib"] / 3


# -------------------------------------------------------------- the CLI


def cli(workdir, devices, *args):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    cmd = [sys.executable, "-m", "experiments.train", "--task", "reverse", "--workdir", str(workdir), "steps=4",
           "warmup_steps=1", "eval_every=2", "checkpoint_every=2", "log_every=1", "num_examples=2000",
           "batch_size=32", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          cwd=pathlib.Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


@pytest.mark.slow  # three training subprocesses
def test_two_processes_of_two_devices_equal_one_process_of_four(tmp_path):
    one_losses, one_val = cli(tmp_path / "one", 4, "--mesh", "data=2,model=2")
    two_losses, two_val = cli(tmp_path / "two", 2, "--mesh", "data=2,model=2", "--processes", "2")
    assert len(two_losses) == 4 and len(two_val) == 2
    np.testing.assert_allclose(two_losses, one_losses, atol=TOL, rtol=0)
    np.testing.assert_allclose(two_val, one_val, atol=TOL, rtol=0)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]


def test_a_failed_process_stops_the_others(tmp_path, capfd):
    """--processes N: when one process fails, the launcher returns its exit code and terminates
    the rest instead of leaving them blocked in a collective waiting for it."""
    from experiments.train import run_processes

    ready, stopped = tmp_path / "ready", tmp_path / "stopped"
    waiter = (f"import signal, sys, time, pathlib\n"
              f"def stop(*_): pathlib.Path({str(stopped)!r}).touch(); sys.exit(1)\n"
              f"signal.signal(signal.SIGTERM, stop)\n"
              f"pathlib.Path({str(ready)!r}).touch()\n"
              f"time.sleep(600)")
    failer = f"import pathlib, sys, time\nwhile not pathlib.Path({str(ready)!r}).exists(): time.sleep(0.05)\nsys.exit(3)"
    assert run_processes([[sys.executable, "-c", waiter], [sys.executable, "-c", failer]]) == 3
    assert stopped.exists()
    assert "process 1 exited with code 3; stopping the others" in capfd.readouterr().err
