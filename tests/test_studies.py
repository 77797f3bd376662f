"""experiments/studies: the shared verdict rule on known answers, and the heads study end to end (--quick)."""

import json

import numpy as np
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
