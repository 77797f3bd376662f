"""experiments/studies: the shared verdict rule on known answers, and the heads study end to end (--quick)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.studies import common


def test_verdict_rule_on_known_answers():
    low, high = [1.0, 1.1, 0.9], [2.0, 2.1, 1.9]
    assert common.verdict("a < b", "a", low, "b", high, metric="m")["verdict"] == "holds"
    assert common.verdict("a < b", "a", high, "b", low, metric="m")["verdict"] == "does not hold"
    assert common.verdict("a < b", "a", low, "b", [1.0, 1.2, 0.95], metric="m")["verdict"] == "inconclusive"
    # one seed has no spread to compare against
    assert common.verdict("a < b", "a", [1.0], "b", [5.0], metric="m")["verdict"] == "inconclusive"
    s = common.stats([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["sd"] == pytest.approx(1.0)


def test_member_lm_batches_are_per_member_and_pure():
    tokens = np.arange(1000, dtype=np.int32)
    batch = common.member_lm_batches(tokens, S=3, batch_size=4, seq_len=8)
    b = batch(5)
    assert b["inputs"].shape == (3, 4, 8)
    np.testing.assert_array_equal(b["targets"][..., :-1], b["inputs"][..., 1:])
    assert not np.array_equal(b["inputs"][0], b["inputs"][1])  # members draw their own windows
    np.testing.assert_array_equal(batch(5)["inputs"], b["inputs"])  # a pure function of the step


class _StopAfter(common.Study):
    """A study whose deadline passes after ``checks`` calls of ``out_of_time`` (one per step)."""

    def __init__(self, out, checks):
        super().__init__(name="toy", claim="", out=out, seeds=[0, 1], quick=True, deadline=None)
        self.checks = checks

    def out_of_time(self):
        self.checks -= 1
        return self.checks < 0


def _toy_arm(study):
    """Two members fitting w to a per-member target by SGD: loss = |w - y|², batches pure in the step."""
    def loss_fn(params, model_state, batch, key=None, train=True, **_):
        loss = ((params["w"] - batch["y"]) ** 2).sum()
        return loss, ({"loss": loss}, model_state)

    return common.train_arm(
        study, "toy", init_params=lambda k: {"w": jax.random.normal(k, (3,))}, loss_fn=loss_fn,
        optimizer=optax.sgd(0.1), steps=6, eval_every=2,
        batch=lambda step: {"y": jnp.full((2, 3), float(step % 3))},
        evaluate=lambda ens: {"w0": np.asarray(ens.state.params["w"][:, 0])})


@pytest.mark.parametrize("stops", [(2, 1), (3,), (2, 0, 1)], ids=["after-checkpoint", "mid-interval", "twice"])
def test_train_arm_resumes_exactly_wherever_the_deadline_falls(tmp_path, stops):
    """Interrupted at the step a checkpoint was just written (orbax refuses a second save of a
    step), between checkpoints, or right after resuming: the rerun ends where one run ends."""
    whole = _toy_arm(_StopAfter(tmp_path / "whole", 10**6))
    for checks in stops:
        assert _toy_arm(_StopAfter(tmp_path / "cut", checks)) is None
    resumed = _toy_arm(_StopAfter(tmp_path / "cut", 10**6))
    np.testing.assert_allclose(resumed["final"]["w0"], whole["final"]["w0"], rtol=1e-6)
    assert [c["step"] for c in resumed["curves"]] == [2, 4, 6]


@pytest.mark.slow
def test_heads_quick(tmp_path):
    from experiments.studies import heads
    summary = heads.main(["--quick", "--out", str(tmp_path)])
    for name in ("summary.json", "table.md", "lm_loss.png", "two_key_sum.png", "pruning.png"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["seeds"] == [0, 1, 2] and saved["verdicts"] == summary["verdicts"]
    pruning = saved["arms"]["lm-h4"]["pruning"]["increase"]
    assert np.asarray(pruning).shape == (1, 4, 3)  # [layers, heads, seeds]
    assert all(v["verdict"] in ("holds", "does not hold", "inconclusive") for v in saved["verdicts"])
    # a rerun loads every finished arm instead of training it again
    again = heads.main(["--quick", "--out", str(tmp_path)])
    assert again["arms"]["lm-h1"]["final"] == summary["arms"]["lm-h1"]["final"]
