"""experiments/studies/attention_maps: the head statistics on known answers, its data helpers, and the
study end to end (--quick, slow)."""

import json
import math

import numpy as np
import pytest

from experiments.studies import attention_maps as am


def _one(a):
    """A single [T, S] map as weights [L=1, B=1, N=1, T, S]."""
    return np.asarray(a, np.float32)[None, None, None]


def _scalar(stats, name):
    return float(np.asarray(stats[name]).reshape(-1)[0])


def test_uniform_attention_has_entropy_log_S():
    T, S = 3, 5
    stats = am.head_stats(_one(np.full((T, S), 1.0 / S)))
    assert _scalar(stats, "entropy") == pytest.approx(math.log(S), rel=1e-5)
    assert _scalar(stats, "uniform_entropy") == pytest.approx(math.log(S), rel=1e-5)
    # mean over queries i of mean_j |i - j|
    expected = np.mean([np.mean([abs(i - j) for j in range(S)]) for i in range(T)])
    assert _scalar(stats, "distance") == pytest.approx(expected, rel=1e-5)
    assert np.shape(stats["entropy"]) == (1, 1)  # [L, N]


def test_identity_map_has_entropy_and_distance_zero():
    stats = am.head_stats(_one(np.eye(6)))
    assert _scalar(stats, "entropy") == pytest.approx(0.0, abs=1e-7)
    assert _scalar(stats, "distance") == pytest.approx(0.0, abs=1e-7)
    assert _scalar(stats, "previous") == pytest.approx(0.0, abs=1e-7)


def test_previous_token_map_has_distance_one():
    T = 6
    prev = np.eye(T, k=-1)
    prev[0, 0] = 1.0  # the first query has no previous token: it attends itself
    stats = am.head_stats(_one(prev), causal=True)
    assert _scalar(stats, "previous") == pytest.approx(1.0)  # every query i >= 1 puts all weight on i - 1
    assert _scalar(stats, "entropy") == pytest.approx(0.0, abs=1e-7)
    assert _scalar(stats, "distance") == pytest.approx((T - 1) / T)  # row 0 has distance 0
    rows = np.arange(T)[None] > 0  # leaving the first query out: exactly 1
    assert _scalar(am.head_stats(_one(prev), rows, causal=True), "distance") == pytest.approx(1.0)


def test_causal_uniform_matches_its_baseline():
    T = 7
    w = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
    stats = am.head_stats(_one(w), causal=True)
    baseline = np.mean(np.log(np.arange(1, T + 1)))
    assert _scalar(stats, "entropy") == pytest.approx(baseline, rel=1e-5)
    assert _scalar(stats, "uniform_entropy") == pytest.approx(baseline, rel=1e-5)


def test_padding_is_left_out_and_sums_add_over_batches():
    # batch of 2: the second row has 2 real keys (of 4) and 1 real query (of 3)
    w = np.zeros((1, 2, 2, 3, 4), np.float32)
    w[:, 0] = 0.25
    w[:, 1, :, :, :2] = 0.5
    q = np.array([[True, True, True], [True, False, False]])
    k = np.array([[True] * 4, [True, True, False, False]])
    stats = am.head_stats(w, q, k)
    # 3 rows with 4 keys, 1 row with 2 keys, all uniform
    expected = (3 * math.log(4) + math.log(2)) / 4
    np.testing.assert_allclose(np.asarray(stats["entropy"]), expected, rtol=1e-5)
    assert _scalar(stats, "uniform_entropy") == pytest.approx(expected, rel=1e-5)
    # the same totals from two one-row batches
    a, b = am.head_sums(w[:, :1], q[:1], k[:1]), am.head_sums(w[:, 1:], q[1:], k[1:])
    summed = am.head_means(am._add(a, b))
    for name in ("entropy", "distance", "previous", "uniform_entropy"):
        np.testing.assert_allclose(np.asarray(summed[name]), np.asarray(stats[name]), rtol=1e-6)


def test_fixed_pairs_fit_width_and_shared_batches():
    pairs = [([5, 6, 7], [8, 9]), ([5] * 20, [6]), ([4], [9, 9, 9, 9])]
    assert am.fit_width([3, 5], 4, 16) == 8 and am.fit_width([40], 16, 32) == 32
    (b,) = am.fixed_pairs(pairs, 8, 4)
    assert b["src"].shape == b["tgt_in"].shape == (4, 8)
    assert b["tgt_in"][0, :3].tolist() == [1, 8, 9] and b["tgt_out"][0, :3].tolist() == [8, 9, 2]
    assert (b["src"][2:] == 0).all()  # the long pair is left out; PAD rows fill the batch
    from jformer import data
    many = [([4 + i % 7] * (1 + i % 5), [5] * (1 + i % 3)) for i in range(40)]
    batch = am.shared_seq2seq_batches(data.Seq2SeqBatches(many, batch_size=8, seed=0, fixed_shapes=True))
    later = batch(12)  # past the first epoch (5 batches)
    batch(0)
    np.testing.assert_array_equal(batch(12)["src"], later["src"])  # a pure function of the step


def test_labels_of_unknown_words_do_not_crash(tmp_path):
    from jformer import data
    words = "a dog runs through the grass towards camera man woman sits on bench".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 6)) for _ in range(200)]
    tok = data.SubwordTokenizer.train(texts, 30, tmp_path / "spm")
    ids = am.sentence_ids(tok, "The animal didn't cross the street — 你好")
    labels = am.token_labels(tok, [data.BOS, *ids])
    assert len(labels) == len(ids) + 1 and labels[0] == "<s>" and "⁇" in labels


@pytest.mark.slow
def test_attention_maps_quick(tmp_path):
    summary = am.main(["--quick", "--out", str(tmp_path)])
    names = ["summary.json", "table.md", "head_stats.png", "mt_encoder_0.png", "mt_decoder_self_0.png",
             "mt_cross_0.png", "lm_0.png"]
    for name in names:
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["seeds"] == [0, 1, 2] and saved["verdicts"] == summary["verdicts"]
    assert all(v["verdict"] in ("holds", "does not hold", "inconclusive") for v in saved["verdicts"])
    L, N, S = 2, 2, 3  # the quick model: 2 layers, 2 heads; 3 seeds
    assert set(saved["head_stats"]) == {"encoder", "decoder_self", "cross", "lm"}
    for kind, h in saved["head_stats"].items():
        for metric in ("entropy", "distance", "previous"):
            assert np.asarray(h[metric]).shape == (L, N, S), (kind, metric)  # [layers, heads, seeds]
        assert np.asarray(h["uniform_entropy"]).shape == (S,)
        assert np.asarray(saved["head_stats_init"][kind]["entropy"]).shape == (L, N, S)
        # no distribution over n keys has more entropy than the uniform one
        assert (np.asarray(h["entropy"]) <= np.asarray(h["uniform_entropy"]) + 1e-4).all(), kind
    mt, lm = saved["arms"]["mt-quick"], saved["arms"]["lm-quick"]
    m = mt["maps"][0]
    n, t = len(m["source_tokens"]), len(m["target_tokens"])
    assert np.asarray(m["encoder"]).shape == (L, N, n, n)
    assert np.asarray(m["decoder_self"]).shape == (L, N, t, t)
    assert np.asarray(m["cross"]).shape == (L, N, t, n)
    np.testing.assert_allclose(np.asarray(m["cross"]).sum(-1), 1.0, atol=1e-3)  # rows are distributions
    k = len(lm["maps"][0]["tokens"])
    assert lm["maps"][0]["tokens"][0] == "<s>" and np.asarray(lm["maps"][0]["lm"]).shape == (L, N, k, k)
    assert np.allclose(np.triu(np.asarray(lm["maps"][0]["lm"]), 1), 0.0)  # causal
    # a rerun loads both finished arms instead of training them again
    again = am.main(["--quick", "--out", str(tmp_path)])
    assert again["arms"]["mt-quick"]["final"] == mt["final"]


def test_initial_params_are_the_ensembles_step_0():
    import jax
    import optax

    import jformer
    from experiments.studies import common
    from jformer import ensemble
    cfg = jformer.TransformerConfig(vocab_size=16, d_model=8, num_heads=2, num_layers=1, d_ff=16, max_len=8)
    study = common.Study(name="t", claim="", out=None, seeds=[0, 1], quick=True, deadline=None)

    def init(key):
        return jformer.init_lm(key, cfg)

    ens = ensemble.create(init, optax.sgd(0.1), study.keys())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 am.initial_params(study, init), ens.state.params)
