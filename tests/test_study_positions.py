"""experiments/studies/positions.py: the learned-table guard, evaluation past the training length, the
order probe, the verdicts on known answers, and the study end to end (--quick)."""

import functools
import json

import jax
import numpy as np
import pytest

import jformer
from experiments.studies import positions
from jformer import ensemble

CFG = jformer.TransformerConfig(vocab_size=12, d_model=16, num_heads=2, num_layers=1, d_ff=32, dropout_rate=0.0,
                                norm_position="pre", max_len=8, pad_id=None)


def test_only_learned_positions_have_a_table_that_ends():
    for kind in ("none", "sinusoidal", "rope", "alibi"):
        cfg = CFG.replace(positions=kind)
        assert positions.table_note(cfg, 64) is None
        # no parameter depends on max_len, so trained parameters run at any length
        short, long = (jax.eval_shape(functools.partial(jformer.init_lm, cfg=cfg.replace(max_len=n)), jax.random.key(0))
                       for n in (8, 64))
        assert jax.tree.map(lambda a: a.shape, short) == jax.tree.map(lambda a: a.shape, long)
    learned = CFG.replace(positions="learned")
    assert positions.table_note(learned, 8) is None
    assert positions.table_note(learned, 9) == "n/a (table has 8 rows)"
    params = jformer.init_lm(jax.random.key(0), learned)
    with pytest.raises(ValueError, match="exceeds max_len=8"):  # the model's own guard, which table_note mirrors
        jformer.lm_apply(params, np.zeros((1, 9), np.int32), cfg=learned)


@pytest.fixture(scope="module")
def alibi_ensemble():
    cfg = CFG.replace(positions="alibi")
    init = jax.jit(jax.vmap(lambda k: jformer.init_lm(k, cfg)),
                   compiler_options={"xla_backend_optimization_level": 0})
    params = init(jax.random.split(jax.random.key(0), 2))
    state = jformer.training.TrainState(step=np.zeros(2, np.int32), params=params, opt_state=None, model_state={},
                                        key=jax.random.split(jax.random.key(1), 2))
    return cfg, ensemble.Ensemble(state=state, hparams={})


def test_per_position_nll_past_the_training_length(alibi_ensemble):
    cfg, ens = alibi_ensemble
    tokens = np.random.default_rng(0).integers(4, cfg.vocab_size, 257).astype(np.int32)
    at_8 = positions.per_position_nll(ens, cfg, tokens, 8, tokens_per_batch=64)
    at_32 = positions.per_position_nll(ens, cfg, tokens, 32, tokens_per_batch=64)  # 4x the config's max_len
    assert at_8.shape == (2, 8) and at_32.shape == (2, 32) and np.isfinite(at_32).all()
    # the same as one direct forward pass over the 32 contiguous windows of 8
    logits, _ = jformer.lm_apply(jax.tree.map(lambda x: x[0], ens.state.params), tokens[:256].reshape(32, 8), cfg=cfg)
    nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), tokens[1:257].reshape(32, 8, 1), -1)[..., 0]
    np.testing.assert_allclose(at_8[0], nll.mean(0), rtol=1e-5)


def test_order_probe_shuffles_all_but_the_last_input(alibi_ensemble):
    cfg, ens = alibi_ensemble
    tokens = np.random.default_rng(1).integers(4, cfg.vocab_size, 200).astype(np.int32)
    probe = positions.order_probe(ens, cfg, tokens, windows=8, batch_size=4)
    assert set(probe) == {"intact", "shuffled"} and len(probe["intact"]) == 2
    assert probe["intact"] != probe["shuffled"]  # an ALiBi model sees order
    assert positions.unigram_loss(np.array([4, 4, 5]), np.array([4]), 6) == pytest.approx(-np.log(3 / 9))


def _lm(lengths: dict, probe=None):
    return {"lengths": {str(n): {"loss": v} for n, v in lengths.items()},
            "order_probe": probe or {"intact": [1.0, 1.1, 1.0], "shuffled": [3.0, 3.2, 3.1]}}


def test_verdicts_on_known_answers():
    rev = {"reverse-none": {"greedy": {"exact": [0.0, 0.0, 0.01]}},
           "reverse-sinusoidal": {"greedy": {"exact": [0.99, 0.98, 1.0]}}, "reverse-rope": None}
    found = positions.reversal_verdicts(rev)
    assert len(found) == 1 and found[0]["verdict"] == "holds"
    assert positions.reversal_verdicts({"reverse-none": None}) == []

    lm = {"lm-sinusoidal": _lm({64: [1.60, 1.62, 1.61], 512: [2.9, 3.3, 3.1]}),
          "lm-alibi": _lm({64: [1.60, 1.61, 1.62], 512: [1.50, 1.52, 1.51]}),
          "lm-learned": _lm({64: [1.59, 1.61, 1.62], 512: None}),
          "lm-none": _lm({64: [1.80, 1.82, 1.81], 512: [1.9, 2.0, 2.1]}), "lm-rope": None}
    found = {v["claim"].split(" (")[0]: v["verdict"] for v in positions.lm_verdicts(lm, unigram=3.3)}
    assert found == {"past the training length ALiBi beats sinusoidal": "holds",
                     "sinusoidal degrades past its training length": "holds",
                     "ALiBi does not degrade: more context helps": "holds",
                     "anchor, Vaswani Table 3(E): learned and sinusoidal are on par": "inconclusive",
                     "Haviv et al.: the causal LM without positions still uses order": "holds",
                     "the causal LM without positions beats a unigram model": "holds",
                     "positions still help the causal LM": "holds"}
    # a bag-of-characters model: the order probe cannot tell
    blind = {"lm-none": _lm({64: [3.2, 3.3, 3.25]}, {"intact": [3.0, 3.2, 3.1], "shuffled": [3.0, 3.2, 3.1]})}
    found = {v["claim"].split(" (")[0]: v["verdict"] for v in positions.lm_verdicts(blind, unigram=3.3, longest=64)}
    assert found["Haviv et al.: the causal LM without positions still uses order"] == "inconclusive"


@pytest.mark.slow
def test_positions_quick(tmp_path):
    summary = positions.main(["--quick", "--out", str(tmp_path)])
    for name in ("summary.json", "table.md", "reversal_accuracy.png", "lm_length.png", "lm_by_position.png"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["seeds"] == [0, 1, 2] and saved["verdicts"] == summary["verdicts"]
    arms = saved["arms"]
    assert set(arms) == {"reverse-none", "reverse-sinusoidal", "lm-learned", "lm-alibi"}
    for arm in ("reverse-none", "reverse-sinusoidal"):
        assert len(arms[arm]["greedy"]["exact"]) == 3 and 0 <= min(arms[arm]["greedy"]["token"]) <= 1
    assert arms["lm-learned"]["lengths"]["128"] == {"loss": None, "beyond": None, "note": "n/a (table has 64 rows)"}
    assert len(arms["lm-alibi"]["lengths"]["128"]["loss"]) == 3
    assert "n/a (table has 64 rows)" in (tmp_path / "table.md").read_text()
    assert all(v["verdict"] in ("holds", "does not hold", "inconclusive") for v in saved["verdicts"])
    # a rerun loads every finished arm instead of training it again
    again = positions.main(["--quick", "--out", str(tmp_path)])
    assert again["arms"]["lm-alibi"]["lengths"] == summary["arms"]["lm-alibi"]["lengths"]
