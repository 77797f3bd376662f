"""jformer.checkpoint: exact round trips, keep/best policy, corruption fallback, resumable training."""

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jformer as jf
from jformer import training as tr
from jformer.checkpoint import Checkpointer, CheckpointError, TemplateMismatchError, restore_params

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Restores of deliberately damaged files leave orbax's failed read coroutines to the
# garbage collector, which reports them later as "unraisable" exceptions.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# A tiny LM trained with checkpoints. It runs in this process (exec) and, for the
# SIGKILL test, as a script in a subprocess, so both share one definition.
TRAIN_SCRIPT = '''
"""Tiny LM training that checkpoints every SAVE_EVERY steps and prints one JSON line per step."""
import functools, json, sys
import jax, jax.numpy as jnp, numpy as np
import jformer as jf
from jformer import training as tr
from jformer.checkpoint import Checkpointer

CFG = jf.TransformerConfig(vocab_size=19, d_model=16, num_heads=2, num_layers=1, d_ff=32,
                           dropout_rate=0.1, max_len=16)  # dropout > 0: the PRNG key matters
TX, _ = tr.make_optimizer("adamw", learning_rate=1e-2, warmup_steps=3, total_steps=1000,
                          weight_decay=0.01, clip_norm=1.0)
TRAIN_STEP = tr.make_train_step(functools.partial(tr.lm_loss, cfg=CFG), TX)
INIT = jax.jit(jf.init_lm, static_argnums=1)


def fresh_state(seed):
    state = tr.TrainState.create(INIT(jax.random.key(seed), CFG), TX, jax.random.key(seed + 1))
    # Restored arrays are committed to a device; commit the fresh state too, so that
    # both hit the same compiled TRAIN_STEP (jit caches on committed-ness).
    return jax.device_put(state, jax.devices()[0])


def batch_at(position):
    """The data iterator: batch number `position` is a pure function of it, so {"position"} is its state."""
    rng = np.random.default_rng([7, position])
    tokens = rng.integers(1, CFG.vocab_size, size=(4, 9))
    tokens[rng.random(4) < 0.5, 6:] = 0  # padded rows
    return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}


def run(directory, until, save_every, out=None):
    """Train to step `until`, resuming from `directory` if it has a checkpoint. Returns ({step: loss}, state)."""
    ckpt = Checkpointer(directory) if directory else None
    state, position = fresh_state(0), 0
    restored = ckpt.restore(fresh_state(100)) if ckpt else None  # the template's values are not used
    if restored:
        state, data_state, _ = restored
        position = data_state["position"]
    losses = {}
    while int(state.step) < until:
        state, metrics = TRAIN_STEP(state, batch_at(position))  # donates the old state
        position += 1
        step = int(state.step)
        losses[step] = float(metrics["loss"])
        if out:
            print(json.dumps({"step": step, "loss": losses[step]}), file=out, flush=True)
        if ckpt and step % save_every == 0:
            ckpt.save(step, state, data_state={"position": position})  # async: returns before the write
    if ckpt:
        ckpt.close()
    return losses, state


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), out=sys.stdout)
'''
train = {"__name__": "train_script"}
exec(compile(TRAIN_SCRIPT, "train_script", "exec"), train)


def assert_trees_equal(a, b):
    unkey = lambda t: jax.tree.map(  # noqa: E731
        lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, t)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, unkey(a), unkey(b))


def small_state(value, key=None):
    """A cheap TrainState whose params identify the step they were saved at."""
    tx = optax.adam(1e-3)
    params = {"dense": {"kernel": jnp.full((3, 4), float(value)), "bias": jnp.arange(4.0) + value}}
    return tr.TrainState.create(params, tx, jax.random.key(0) if key is None else key)


def step_dirs(directory):
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


# ------------------------------------------------------------- round trip


def test_round_trip_of_a_trained_batch_norm_lm_is_exact(tmp_path):
    cfg = train["CFG"].replace(norm="batch")
    tx = train["TX"]
    step = tr.make_train_step(lambda *a, **k: tr.lm_loss(*a, cfg=cfg, **k), tx)

    def fresh(seed):
        params = jax.jit(jf.init_lm, static_argnums=1)(jax.random.key(seed), cfg)
        return tr.TrainState.create(params, tx, jax.random.key(seed + 1), jf.init_state(params, cfg))

    state = fresh(0)
    for position in range(2):  # nonzero Adam moments and BatchNorm statistics
        state, _ = step(state, train["batch_at"](position))
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore(fresh(1)) is None  # no checkpoints yet
        ckpt.save(2, state, data_state={"epoch": 1, "order": [3, 1, 2]}, metrics={"val_loss": 2.5})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2] and ckpt.latest_step() == 2 and ckpt.metrics(2) == {"val_loss": 2.5}
        # A concrete template with other values, and an abstract one (no memory), both work.
        for template in (fresh(1), jax.eval_shape(lambda: fresh(1))):
            restored, data_state, at = ckpt.restore(template)
            assert at == 2 and data_state == {"epoch": 1, "order": [3, 1, 2]}
            assert_trees_equal(restored, state)
            assert jax.random.key_impl(restored.key) == jax.random.key_impl(state.key)
            assert restored.step.dtype == jnp.int32 and restored.model_state  # BatchNorm stats present
    # The restored key continues the same dropout stream.
    np.testing.assert_array_equal(jax.random.key_data(jax.random.fold_in(restored.key, 5)),
                                  jax.random.key_data(jax.random.fold_in(state.key, 5)))


def test_non_default_prng_implementation_round_trips(tmp_path):
    state = small_state(1.0, key=jax.random.key(3, impl="rbg"))
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        restored, data_state, _ = ckpt.restore(small_state(0.0))  # template key is threefry
    assert data_state is None and str(jax.random.key_impl(restored.key)) == "rbg"
    assert_trees_equal(restored, state)


# ---------------------------------------------------------- keep and best


@pytest.mark.parametrize("mode, metric, values, best", [
    ("min", "val_loss", [3.0, 1.0, 4.0, 5.0, 6.0, 7.0], 2),
    ("max", "bleu", [3.0, 9.0, 4.0, 5.0, 6.0, 7.0], 2),
    ("min", "val_loss", [3.0, 4.0, 5.0, 6.0, 0.5, 7.0], 5),  # best is also among the latest
])
def test_keeps_the_latest_two_and_the_best(tmp_path, mode, metric, values, best):
    with Checkpointer(tmp_path, keep=2, best_metric=metric, best_mode=mode) as ckpt:
        for step, value in enumerate(values, start=1):
            ckpt.save(step, small_state(step), metrics={metric: value, "other": -step})
        ckpt.save(7, small_state(7))  # no metrics: kept as recent, never best
        ckpt.wait_until_finished()
        assert ckpt.best_step() == best
        assert ckpt.all_steps() == step_dirs(tmp_path) == sorted({best, 6, 7})
        restored, _, at = ckpt.restore_best(small_state(0))
        assert at == best and float(restored.params["dense"]["kernel"][0, 0]) == best
        assert ckpt.restore(small_state(0))[2] == 7


def test_best_is_none_without_the_metric(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, small_state(1), metrics={"train_loss": 1.0})
        ckpt.wait_until_finished()
        assert ckpt.best_step() is None and ckpt.restore_best(small_state(0)) is None


# --------------------------------------------------------------- corruption


def _truncate_data(step_dir):
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / "state") if os.path.basename(d) == "d"
             for f in fs]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def _delete_data(step_dir):
    for d, _, fs in os.walk(step_dir / "state"):
        if os.path.basename(d) == "d":
            for f in fs:
                os.remove(os.path.join(d, f))


def _delete_manifest(step_dir):
    os.remove(step_dir / "state" / "manifest.ocdbt")


def _half_written(step_dir):
    """A non-atomic writer killed midway: a newer step directory with only part of the files."""
    half = step_dir.parent / str(int(step_dir.name) + 1)
    shutil.copytree(step_dir, half)
    shutil.rmtree(half / "state")


@pytest.mark.parametrize("damage", [_truncate_data, _delete_data, _delete_manifest, _half_written])
def test_corrupted_latest_falls_back_to_the_previous_checkpoint(tmp_path, caplog, damage):
    with Checkpointer(tmp_path, keep=3) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, small_state(step), data_state={"position": step})
    damage(tmp_path / "3")
    bad = 4 if damage is _half_written else 3
    good = 3 if damage is _half_written else 2
    with caplog.at_level(logging.WARNING, logger="jformer.checkpoint"), Checkpointer(tmp_path, keep=3) as ckpt:
        assert ckpt.latest_step() == bad
        restored, data_state, at = ckpt.restore(small_state(0))
        assert at == good and data_state == {"position": good}
        assert_trees_equal(restored, small_state(good))
        warning = next(r.getMessage() for r in caplog.records if f"step {bad} " in r.getMessage())
        assert "unreadable" in warning and "Error" in warning, warning  # names the step and the reason
        # The damaged step was moved aside, so the resumed run can save that step again.
        assert ckpt.all_steps() == [s for s in (1, 2, 3) if s <= good]
        assert os.listdir(tmp_path / "corrupt")[0].startswith(f"{bad}-")
        assert ckpt.save(bad, small_state(10 + bad))
        ckpt.wait_until_finished()
        assert ckpt.restore(small_state(0))[2] == bad


def test_killed_save_leftovers_are_ignored_and_cleaned(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, small_state(1))
    leftover = tmp_path / "2.orbax-checkpoint-tmp-1234567"  # what a save killed before its rename leaves
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "manifest.ocdbt").write_bytes(b"\0garbage")
    with Checkpointer(tmp_path) as ckpt:  # deletes leftovers in the background, before its first save
        assert ckpt.all_steps() == [1]
        assert ckpt.restore(small_state(0))[2] == 1
        assert ckpt.save(2, small_state(2))
        ckpt.wait_until_finished()
        assert not leftover.exists() and ckpt.restore(small_state(0))[2] == 2


def test_all_corrupt_raises_and_empty_returns_none(tmp_path):
    assert Checkpointer(tmp_path / "empty").restore(small_state(0)) is None
    with Checkpointer(tmp_path / "ck") as ckpt:
        for step in (1, 2):
            ckpt.save(step, small_state(step))
    for step in (1, 2):
        _delete_manifest(tmp_path / "ck" / str(step))
    with Checkpointer(tmp_path / "ck") as ckpt, pytest.raises(CheckpointError, match=r"step 2: .*step 1: "):
        ckpt.restore(small_state(0))
    assert step_dirs(tmp_path / "ck") == [1, 2]  # nothing moved when nothing restores


def test_wrong_template_is_an_error_not_a_fallback(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2):
            ckpt.save(step, small_state(step))
    wrong = small_state(0).replace(params={"dense": {"kernel": jnp.zeros((3, 5)), "bias": jnp.zeros(5)}})
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointError, match="shape"):
        ckpt.restore(wrong)
    assert step_dirs(tmp_path) == [1, 2]


# ---------------------------------------------------------- params only


def bn_state(value, size=32):
    """``small_state`` plus a random ``head`` kernel [size, size] and BatchNorm statistics.

    Random floats do not compress, so the head kernel has a data file of its own that
    a damage test can flip bytes in (see tests/test_bad_input_io.py)."""
    params = {**small_state(value).params, "head": {"kernel": jax.random.normal(jax.random.key(int(value)),
                                                                                  (size, size))}}
    model_state = {"norm": {"mean": jnp.full(4, float(value)), "var": jnp.full(4, 1.0 + value)}}
    return tr.TrainState.create(params, optax.adam(1e-3), jax.random.key(0), model_state)


def _flip_largest_data_file(step_dir):
    """Flip 16 bytes in the middle of the step's largest array data file(s) (the head kernel)."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    largest = max(p.stat().st_size for p in files)
    for target in (p for p in files if p.stat().st_size == largest):
        raw = bytearray(target.read_bytes())
        middle = len(raw) // 2
        raw[middle:middle + 16] = bytes(b ^ 0xFF for b in raw[middle:middle + 16])
        target.write_bytes(bytes(raw))


def test_restore_params_reads_params_and_batch_norm_statistics_only(tmp_path):
    with Checkpointer(tmp_path, keep=3) as ckpt:
        for step, val_loss in ((1, 3.0), (2, 1.0), (3, 2.0)):
            ckpt.save(step, bn_state(step), metrics={"val_loss": val_loss})
    template = bn_state(0)
    params, model_state, at = restore_params(tmp_path, template.params, template.model_state)
    assert at == 3
    assert_trees_equal((params, model_state), (bn_state(3).params, bn_state(3).model_state))
    # Abstract templates (no memory, no optimizer, no TrainState), and the best checkpoint.
    abstract = jax.eval_shape(lambda: (template.params, template.model_state))
    params, model_state, at = restore_params(tmp_path, *abstract, best=True)
    assert at == 2 and isinstance(params["head"]["kernel"], jax.Array)
    assert_trees_equal((params, model_state), (bn_state(2).params, bn_state(2).model_state))
    # The leaves come back in the template's dtypes.
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), template.params)
    params, _, _ = restore_params(tmp_path, half, template.model_state)
    assert params["head"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(params["head"]["kernel"], bn_state(3).params["head"]["kernel"].astype(jnp.bfloat16))
    # Without BatchNorm: model_state None stands for {}.
    with Checkpointer(tmp_path / "ln") as ckpt:
        ckpt.save(1, small_state(1))
        params, model_state, at = ckpt.restore_params(small_state(0).params)
    assert at == 1 and model_state == {}
    assert_trees_equal(params, small_state(1).params)
    assert restore_params(tmp_path / "missing", template.params) is None
    assert not (tmp_path / "missing").exists()
    with Checkpointer(tmp_path / "empty") as ckpt:
        assert ckpt.restore_params(template.params) is None
        ckpt.save(1, small_state(1), metrics={"train_loss": 1.0})
        ckpt.wait_until_finished()
        assert ckpt.restore_params(small_state(0).params, best=True) is None  # none reported val_loss


def test_restore_params_detects_a_damaged_array_and_falls_back(tmp_path, caplog):
    with Checkpointer(tmp_path, keep=3) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, bn_state(step))
    _flip_largest_data_file(tmp_path / "3")
    template = bn_state(0)
    with caplog.at_level(logging.WARNING, logger="jformer.checkpoint"):
        params, model_state, at = restore_params(tmp_path, template.params, template.model_state)
    assert at == 2
    assert_trees_equal((params, model_state), (bn_state(2).params, bn_state(2).model_state))
    warning = next(r.getMessage() for r in caplog.records if "step 3 " in r.getMessage())
    assert "unreadable" in warning and "params/head/kernel" in warning and "crc32" in warning, warning
    assert step_dirs(tmp_path) == [1, 2] and os.listdir(tmp_path / "corrupt")[0].startswith("3-")
    # With every step damaged nothing restores, and the error lists them.
    for step in (1, 2):
        _flip_largest_data_file(tmp_path / str(step))
    with pytest.raises(CheckpointError, match=r"step 2: .*params/head/kernel.*step 1: "):
        restore_params(tmp_path, template.params, template.model_state)


def test_restore_params_names_the_entries_a_wrong_template_misses(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2):
            ckpt.save(step, bn_state(step))
    template = bn_state(0)
    wrong_shape = {**template.params, "dense": {"kernel": jnp.zeros((3, 5)), "bias": jnp.zeros(4)}}
    no_head = {"dense": template.params["dense"]}
    for params, model_state, names in (
            (wrong_shape, template.model_state, r"shapes differ: params/dense/kernel \(checkpoint float32\[3, 4\], "
                                                r"template float32\[3, 5\]\)"),
            (no_head, template.model_state, "in the checkpoint but not the template: params/head/kernel"),
            (template.params, None, "in the checkpoint but not the template: model_state/norm/mean"),
            ({**template.params, "extra": jnp.zeros(2)}, template.model_state,
             "in the template but not the checkpoint: params/extra")):
        with pytest.raises(TemplateMismatchError, match=names):
            restore_params(tmp_path, params, model_state)
    assert step_dirs(tmp_path) == [1, 2] and not (tmp_path / "corrupt").exists()  # no fallback, nothing moved


# ------------------------------------------------------------------ resume


def test_resumed_training_reproduces_the_uninterrupted_run(tmp_path):
    reference, ref_state = train["run"](None, 10, 0)
    first, _ = train["run"](tmp_path, 5, 5)  # stops after saving step 5 (async, state donated next)
    resumed, state = train["run"](tmp_path, 10, 5)  # fresh template, restores step 5 and its data position
    assert sorted(first) == [1, 2, 3, 4, 5] and sorted(resumed) == [6, 7, 8, 9, 10]
    for step, loss in {**first, **resumed}.items():
        np.testing.assert_allclose(loss, reference[step], rtol=0, atol=1e-6)
    assert_trees_equal(state, ref_state)


STALL_S = 600  # how long a subprocess may show no progress at all before a test calls it hung


@pytest.mark.slow  # a training subprocess, then two more training runs
def test_sigkill_during_training_then_resume(tmp_path):
    """A real interruption: SIGKILL a training process that saves every 2 steps, then resume."""
    script, directory, log = tmp_path / "train.py", tmp_path / "ck", tmp_path / "log.jsonl"
    script.write_text(TRAIN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    errors = tmp_path / "stderr.txt"
    with open(log, "w") as out, open(errors, "w") as err:
        proc = subprocess.Popen([sys.executable, str(script), str(directory), "1000000", "2"], stdout=out,
                                stderr=err, env=env)
        try:  # kill once 3 checkpoints (2, 4, 6) are final, preferably while a later one is being written
            # Not a timing test: a loaded machine may take minutes to start JAX and compile. The guards
            # only stop a run that is stuck: no new logged step nor checkpoint for STALL_S, or steps
            # going on without checkpoints (each save waits for the previous one to be final).
            progress, last_progress = None, time.monotonic()
            while not (directory.exists() and any(s >= 6 for s in step_dirs(directory))):
                assert proc.poll() is None, f"training script died:\n{errors.read_text()[-3000:]}"
                steps = log.read_text().count("\n")
                now = (steps, step_dirs(directory) if directory.exists() else [])
                if now != progress:
                    progress, last_progress = now, time.monotonic()
                assert time.monotonic() - last_progress < STALL_S, \
                    f"training script stuck at {progress} (steps logged, checkpoints) for {STALL_S} s"
                assert steps < 1000, f"{steps} steps logged but no checkpoint of step 6 or later: {progress[1]}"
                time.sleep(0.01)
            ready = time.monotonic()
            while not any(".orbax-checkpoint-tmp" in n for n in os.listdir(directory)) \
                    and time.monotonic() - ready < 5:
                time.sleep(0.001)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    killed = {r["step"]: r["loss"] for r in map(json.loads, log.read_text().splitlines())}
    with Checkpointer(directory) as ckpt:
        resume_at = ckpt.latest_step()
    assert resume_at >= 6 and resume_at % 2 == 0
    resumed, _ = train["run"](directory, resume_at + 6, 2)
    reference, _ = train["run"](None, max(max(killed), resume_at + 6), 0)
    assert sorted(resumed) == list(range(resume_at + 1, resume_at + 7))
    for losses in (killed, resumed):  # the killed run, too, matches the reference
        for step, loss in losses.items():
            np.testing.assert_allclose(loss, reference[step], rtol=0, atol=1e-6, err_msg=f"step {step}")
    # The half-written save was discarded; the resumed run saved its steps again.
    assert sorted(os.listdir(directory)) == [str(resume_at + 4), str(resume_at + 6)]
