"""Bad-input cases for files: checkpoints, tokenizers.

A damaged or mismatched file must give an error (or a logged fallback) that names the
file, step or entry, never a plausible, finite, wrong result.
"""

import json
import logging
import re

import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jformer import data
from jformer import training as tr
from jformer.checkpoint import Checkpointer, CheckpointError
from tests.test_checkpoint import assert_trees_equal, small_state, step_dirs

# Restores of deliberately damaged files leave orbax's failed read coroutines to the
# garbage collector, which reports them later as "unraisable" exceptions.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


# ------------------------------------------------------------------ checkpoints


def head_state(value, *, head=True, size=32):
    """``small_state`` plus a random ``head`` kernel [size, size]. Random floats do not compress,
    and chunks this large are not inlined in tensorstore's checksummed index nodes, so orbax
    stores them in a data file of their own: a flipped byte there used to come back as a
    silently changed parameter."""
    params = dict(small_state(value).params)
    if head:
        params["head"] = {"kernel": jax.random.normal(jax.random.key(int(value)), (size, size))}
    return tr.TrainState.create(params, optax.adam(1e-3), jax.random.key(0))


def damage_array_data(step_dir, how):
    """Flip 16 bytes, or one bit, in the middle of the step's largest array data file.

    Orbax may leave an identical copy of it beside the one it reads (``state/d`` and
    ``state/ocdbt.process_0/d``), so every file of the largest size is damaged alike.
    """
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    largest = max(p.stat().st_size for p in files)
    for target in (p for p in files if p.stat().st_size == largest):
        raw = bytearray(target.read_bytes())
        middle = len(raw) // 2
        if how == "16 bytes":
            raw[middle:middle + 16] = bytes(b ^ 0xFF for b in raw[middle:middle + 16])
        else:
            raw[middle] ^= 0x10
        target.write_bytes(bytes(raw))


def save_steps(directory, steps, state_at=head_state, metrics=None):
    with Checkpointer(directory, keep=len(steps)) as ckpt:
        for step in steps:
            ckpt.save(step, state_at(step), data_state={"position": step}, metrics=(metrics or {}).get(step))


def warnings_about(caplog, step):
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and f"step {step} " in r.getMessage()]


@pytest.mark.parametrize("how", ["16 bytes", "1 bit"])
def test_flipped_array_bytes_fall_back_to_the_previous_step(tmp_path, caplog, how):
    save_steps(tmp_path, (1, 2, 3))
    damage_array_data(tmp_path / "3", how)
    with caplog.at_level(logging.WARNING, logger="jformer.checkpoint"), Checkpointer(tmp_path, keep=3) as ckpt:
        restored, data_state, at = ckpt.restore(head_state(0))
        assert at == 2 and data_state == {"position": 2}
        assert_trees_equal(restored, head_state(2))
        warning = warnings_about(caplog, 3)[0]
        assert "unreadable" in warning and "params/head/kernel" in warning, warning
        assert ckpt.all_steps() == [1, 2]
    assert [p.name.split("-")[0] for p in (tmp_path / "corrupt").iterdir()] == ["3"]


def test_all_steps_damaged_raises_naming_them_and_moves_nothing(tmp_path):
    save_steps(tmp_path, (1, 2))
    for step in (1, 2):
        damage_array_data(tmp_path / str(step), "1 bit")
    with Checkpointer(tmp_path) as ckpt, \
            pytest.raises(CheckpointError, match=r"step 2: .*params/head/kernel.*step 1: .*params/head/kernel"):
        ckpt.restore(head_state(0))
    assert step_dirs(tmp_path) == [1, 2] and not (tmp_path / "corrupt").exists()


def test_restore_best_with_a_damaged_best_falls_back_to_the_next_best(tmp_path, caplog):
    save_steps(tmp_path, (1, 2, 3), metrics={s: {"val_loss": float(s)} for s in (1, 2, 3)})
    damage_array_data(tmp_path / "1", "16 bytes")
    with caplog.at_level(logging.WARNING, logger="jformer.checkpoint"), Checkpointer(tmp_path, keep=3) as ckpt:
        restored, data_state, at = ckpt.restore_best(head_state(0))
        assert at == 2 and data_state == {"position": 2}
        assert_trees_equal(restored, head_state(2))
        assert "params/head/kernel" in warnings_about(caplog, 1)[0]
        assert ckpt.all_steps() == [2, 3] and ckpt.best_step() == 2


def test_template_without_head_is_an_error_naming_head_and_moves_nothing(tmp_path):
    save_steps(tmp_path, (1, 2))
    damage_array_data(tmp_path / "2", "1 bit")  # even beside a damaged step, a wrong template quarantines nothing
    with Checkpointer(tmp_path) as ckpt, pytest.raises(ValueError, match="params/head/kernel") as error:
        ckpt.restore(head_state(0, head=False))
    assert isinstance(error.value, CheckpointError)
    assert "in the checkpoint but not the template" in str(error.value) and "step 2" in str(error.value)
    assert step_dirs(tmp_path) == [1, 2] and not (tmp_path / "corrupt").exists()


def test_checkpoint_without_checksums_still_restores_with_a_note(tmp_path, caplog):
    save_steps(tmp_path, (1,))
    meta_file = tmp_path / "1" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    assert set(meta["crc32"]) == {"step", "key", "params/dense/kernel", "params/dense/bias", "params/head/kernel",
                                  *(f"opt_state/0/{m}/{p}" for m in ("mu", "nu")
                                    for p in ("dense/kernel", "dense/bias", "head/kernel")), "opt_state/0/count"}
    del meta["crc32"]
    meta_file.write_text(json.dumps({**meta, "format": 1}))  # as written before checksums existed
    with caplog.at_level(logging.WARNING, logger="jformer.checkpoint"), Checkpointer(tmp_path) as ckpt:
        restored, data_state, at = ckpt.restore(head_state(0))
    assert at == 1 and data_state == {"position": 1}
    assert_trees_equal(restored, head_state(1))
    assert "cannot be verified" in warnings_about(caplog, 1)[0]


def test_sharded_checkpoint_is_verified_whole_and_restores_on_another_mesh(tmp_path, caplog):
    """Checksums cover whole arrays, so they hold across meshes; damage in one shard's data is caught."""
    def sharded(state, devices):
        mesh = Mesh(np.array(devices), ("x",))
        spec = lambda x: P("x") if x.ndim == 2 and x.shape[0] % len(devices) == 0 else P()  # noqa: E731
        return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), state)

    # 64 x 64: each of the 8 shards (2 KB) is too large to be inlined in an index node.
    save_steps(tmp_path, (1, 2), state_at=lambda s: sharded(head_state(s, size=64), jax.devices()[:8]))
    template = sharded(head_state(0, size=64), jax.devices()[:4])
    with caplog.at_level(logging.WARNING, logger="jformer.checkpoint"), Checkpointer(tmp_path) as ckpt:
        restored, _, at = ckpt.restore(template)
        assert at == 2 and not caplog.records
        assert_trees_equal(restored, head_state(2, size=64))
        head = restored.params["head"]["kernel"]
        assert head.sharding == template.params["head"]["kernel"].sharding
    damage_array_data(tmp_path / "2", "16 bytes")
    with caplog.at_level(logging.WARNING, logger="jformer.checkpoint"), Checkpointer(tmp_path) as ckpt:
        restored, _, at = ckpt.restore(template)
    assert at == 1 and "params/head/kernel" in warnings_about(caplog, 2)[0]
    assert_trees_equal(restored, head_state(1, size=64))


# ------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("damage, problem", [
    (lambda text: text[:17], r"not valid JSON \(.*line 1 column 18"),  # truncated
    (lambda text: text.replace('"chars"', '"ch\x01rs"'), "not valid JSON"),  # garbled
    (lambda text: text.replace('"chars"', '"charz"'), "missing key 'chars'"),
    (lambda text: text.replace('"d"', '"e"'), r"duplicate characters: \['e'\]"),
    (lambda text: text.replace('"d"', "7"), "single characters.*7"),
    (lambda text: "[]", "JSON list, expected an object"),
])
def test_damaged_char_tokenizer_file_is_a_value_error_naming_the_file(tmp_path, damage, problem):
    path = tmp_path / "tok.json"
    data.CharTokenizer.fit("hello world").save(path)
    path.write_text(damage(path.read_text()))
    for load in (data.CharTokenizer.load, data.load_tokenizer):
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + problem):
            load(path)


def test_damaged_sentencepiece_model_is_a_value_error_naming_the_file(tmp_path):
    pytest.importorskip("sentencepiece")
    data.SubwordTokenizer.train(["the quick brown fox", "jumps over the lazy dog"] * 10, 32, tmp_path / "spm")
    model = (tmp_path / "spm.model").read_bytes()
    for name, content in (("truncated", model[:len(model) // 2]), ("empty", b""), ("text", b"hello")):
        path = tmp_path / f"{name}.model"
        path.write_bytes(content)
        for load in (data.SubwordTokenizer.load, data.load_tokenizer):
            with pytest.raises(ValueError, match=re.escape(str(path))):
                load(path)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        data.load_tokenizer(tmp_path / "missing.model")
