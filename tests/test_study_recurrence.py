"""experiments/studies/recurrence.py: equal-parameter sizing, the recall task and its distance
buckets on known answers, and the study end to end (--quick)."""

import json
import types

import numpy as np
import pytest

from experiments.studies import recurrence as rec


def test_match_width_finds_the_nearest_count():
    square = lambda w: w * w  # noqa: E731
    assert rec.match_width(square, 1000) == (32, 1024)  # 31² = 961 is 39 away, 32² = 1024 only 24
    assert rec.match_width(square, 961) == (31, 961)
    assert rec.match_width(square, 0) == (1, 1)  # below the smallest width: the smallest
    assert rec.match_width(square, 10**9, hi=100) == (100, 10_000)  # above the largest: the largest


@pytest.mark.parametrize("part", ["m30k", "recall"])
def test_recurrent_models_are_sized_within_5_percent_of_the_transformer(part):
    if part == "m30k":
        toks = {"de": types.SimpleNamespace(vocab_size=2100), "en": types.SimpleNamespace(vocab_size=1900)}
        models = rec.m30k_models(toks, rec.FULL["m30k"])
        counts = {n: rec.param_count(init, cfg) for n, (cfg, init, _) in models.items()}
    else:
        models = rec.recall_models(rec.FULL["recall"])
        counts = {n: rec.param_count(init, cfg) for n, (cfg, init, _) in models.items()}
    assert set(counts) == {"transformer", "gru", "lstm"}
    for cell in ("gru", "lstm"):
        assert abs(counts[cell] - counts["transformer"]) <= 0.05 * counts["transformer"], counts
    assert models["gru"][0].d_hidden > models["lstm"][0].d_hidden  # 3 gates vs 4: the GRU gets more width


def test_sized_refuses_a_count_it_cannot_reach():
    cfg = rec.recurrent.RNNConfig(cell="gru", vocab_size=1000, d_embed=64, d_hidden=8)
    with pytest.raises(ValueError, match="within 5%"):
        rec.sized(cfg, rec.recurrent.init_rnn_seq2seq, 1000)  # the embeddings alone are bigger


def test_recall_batch_asks_for_the_stored_values():
    b = rec.recall_batch(3, 7, 16, length=40, pairs=5)
    inputs, targets, distance = b["inputs"], b["targets"], b["distance"]
    assert inputs.shape == targets.shape == distance.shape == (16, 40)
    assert (inputs != rec.UNSCORED).all() and inputs.max() < rec.RECALL_VOCAB
    asked = targets != rec.UNSCORED
    assert (asked.sum(1) == 5).all() and asked[:, 35:].all()  # every key asked once, at the end
    for row, t in zip(*np.nonzero(asked)):
        item = inputs[row, t - distance[row, t]]  # the stored item the distance points at
        key, value = divmod(int(item) - rec.ITEM0, rec.NUM_VALUES)
        assert 0 <= key < rec.NUM_KEYS
        assert inputs[row, t] == rec.KEY0 + key and targets[row, t] == rec.VALUE0 + value
    stored = (inputs >= rec.ITEM0) & (inputs < rec.FILLER0)
    assert (stored.sum(1) == 5).all()  # no other stored item in the row
    np.testing.assert_array_equal(rec.recall_batch(3, 7, 16, length=40, pairs=5)["inputs"], inputs)  # pure


def test_accuracy_by_distance_buckets_on_known_answers():
    correct = np.array([[1, 1, 0, 0, 1, 0],
                        [0, 1, 1, 1, 1, 1]], bool)  # [S=2, N=6]
    distance = np.array([1, 5, 8, 12, 20, 30])
    out = rec.accuracy_by_distance(correct, distance, (1, 8, 16, 32, 64))
    assert out[0] == [1.0, 0.5]  # distances 1, 5
    assert out[1] == [0.0, 1.0]  # 8, 12
    assert out[2] == [0.5, 1.0]  # 20, 30
    assert np.isnan(out[3]).all()  # nothing at 32..63


def test_loglog_slope():
    lengths = [16, 32, 64, 128]
    assert rec.loglog_slope(lengths, [3e-3 * t for t in lengths]) == pytest.approx(1.0)
    assert rec.loglog_slope(lengths, [1e-5 * t * t for t in lengths]) == pytest.approx(2.0)


@pytest.mark.slow
def test_recurrence_quick(tmp_path):
    summary = rec.main(["--quick", "--out", str(tmp_path)])
    for name in ("summary.json", "table.md", "m30k_val_loss.png", "step_time.png", "recall_distance.png"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["seeds"] == [0, 1, 2] and saved["verdicts"] == summary["verdicts"] and not saved["not_run"]
    assert saved["bleu_signature"].startswith("nrefs:1|case:mixed")
    arms = saved["arms"]
    for model in rec.QUICK_MODELS:
        m30k = arms[f"m30k-{model}"]
        assert len(m30k["test_bleu"]) == len(m30k["final"]["loss"]) == 3
        assert len(arms[f"recall-{model}"]["by_distance"]) == len(rec.QUICK["recall"]["edges"]) - 1
        for seed in (0, 1, 2):
            lines = (tmp_path / "hypotheses" / f"m30k-{model}-seed{seed}.txt").read_text().splitlines()
            assert len(lines) == rec.QUICK["m30k"]["test_pairs"]
    t, g = arms["m30k-transformer"]["params"], arms["m30k-gru"]["params"]
    assert abs(g - t) <= 0.05 * t
    lm = saved["timing"]["models"]
    assert set(lm) == {"lm-transformer", "lm-gru"}
    assert [r["T"] for r in lm["lm-gru"]["rows"]] == list(rec.QUICK["timing"]["lengths"])
    assert abs(lm["lm-gru"]["params"] - lm["lm-transformer"]["params"]) <= 0.05 * lm["lm-transformer"]["params"]
    assert all(v["verdict"] in ("holds", "does not hold", "inconclusive") for v in saved["verdicts"])
    table = (tmp_path / "table.md").read_text()
    assert f"{t:,}" in table and f"{g:,}" in table  # both parameter counts are printed
    # a rerun loads every finished arm (and the timing) instead of running them again
    again = rec.main(["--quick", "--out", str(tmp_path)])
    assert again["arms"]["m30k-gru"]["test_bleu"] == summary["arms"]["m30k-gru"]["test_bleu"]
    assert again["timing"] == summary["timing"]
