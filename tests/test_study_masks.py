"""experiments/studies/masks.py: the switchable forward pass against lm_apply, the honest (prefix) loss,
causality by gradient, the padding probe, the verdicts on known answers, and the study end to end (--quick)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jformer
from experiments.studies import common, masks
from jformer import data

CFG = jformer.TransformerConfig(vocab_size=20, d_model=16, num_heads=2, num_layers=1, d_ff=32, dropout_rate=0.0,
                                norm_position="pre", positions="learned", max_len=12, pad_id=None)


def init(fn, cfg, seed):
    """``fn(key, cfg)`` compiled for speed of compilation (it runs once)."""
    return jax.jit(fn, static_argnums=1, compiler_options={"xla_backend_optimization_level": 0})(
        jax.random.key(seed), cfg)


@pytest.fixture(scope="module")
def lm_params():
    return init(jformer.init_lm, CFG, 0)


def stacked(params, S=2):
    """[S] members, each with slightly different weights."""
    return jax.tree.map(lambda x: jnp.stack([x * (1.0 + 0.1 * i) for i in range(S)]), params)


def tokens(B=3, T=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(4, CFG.vocab_size, (B, T)), jnp.int32)


def test_causal_forward_is_lm_apply_and_the_switch_removes_the_mask(lm_params):
    x = tokens()
    reference, _ = jformer.lm_apply(lm_params, x, cfg=CFG)
    np.testing.assert_allclose(masks.lm_forward(lm_params, x, cfg=CFG, causal=True), reference, atol=1e-5, rtol=1e-5)
    # without the mask an early position sees a later token: changing the last token changes position 0
    y = x.at[:, -1].set((x[:, -1] + 1 - 4) % (CFG.vocab_size - 4) + 4)
    for causal, changed in ((True, False), (False, True)):
        a = masks.lm_forward(lm_params, x, cfg=CFG, causal=causal)[:, 0]
        b = masks.lm_forward(lm_params, y, cfg=CFG, causal=causal)[:, 0]
        assert bool(jnp.abs(a - b).max() > 1e-6) == changed


def test_prefix_loss_of_a_causal_model_is_its_causal_loss(lm_params):
    """Predicting each position from its prefix alone is what the causal mask already does."""
    x, params = tokens(), stacked(lm_params)
    targets = jnp.roll(x, -1, 1)
    own, causal = masks.own_and_causal_sums(params, x, targets, CFG, True)
    prefix = masks.prefix_sums(params, x, targets, CFG, True)
    np.testing.assert_allclose(prefix, causal, rtol=1e-5)
    np.testing.assert_allclose(own, causal, rtol=1e-6)
    # the unmasked model's prefix loss differs from its (cheating) full-context loss
    own, _ = masks.own_and_causal_sums(params, x, targets, CFG, False)
    assert not np.allclose(masks.prefix_sums(params, x, targets, CFG, False), own, rtol=1e-4)


def test_gradient_map_is_zero_above_the_diagonal_only_with_the_mask(lm_params):
    x, params = tokens(B=2), stacked(lm_params)
    targets = jnp.roll(x, -1, 1)
    causal = np.asarray(masks.gradient_map(params, x, targets, CFG, True))
    free = np.asarray(masks.gradient_map(params, x, targets, CFG, False))
    assert causal.shape == (2, 12, 12)
    upper = np.triu(np.ones((12, 12), bool), 1)
    assert (causal[:, upper] == 0).all() and (np.diagonal(causal, axis1=1, axis2=2) > 0).all()
    assert (free[:, upper] > 0).all()
    np.testing.assert_array_equal(masks.future_fraction(causal), [0.0, 0.0])
    assert (masks.future_fraction(free) > 0.01).all()


def test_padding_effect_mask_on_is_invariant_and_off_is_not():
    cfg = jformer.TransformerConfig(vocab_size=20, d_model=16, num_heads=2, num_layers=1, d_ff=32, dropout_rate=0.0,
                                    norm_position="pre", max_len=9, pad_id=data.PAD)
    params = stacked(init(jformer.init_seq2seq, cfg, 1))
    batch = common.synthetic_batch("reverse", 4, seed=0, min_len=8, max_len=8)
    out = masks.padding_effect(params, cfg, batch, pads=(0, 3))
    assert out["pads"] == [0, 3] and np.shape(out["change_on"]) == (2, 2)
    assert out["change_on"][0] == [0.0, 0.0] and out["change_off"][0] == [0.0, 0.0]
    assert max(out["change_on"][1]) < 1e-4 < min(out["change_off"][1])
    with pytest.raises(ValueError, match="without padding"):
        masks.padding_effect(params, cfg, common.synthetic_batch("reverse", 4, seed=0, min_len=2, max_len=8))


def test_verdicts_on_known_answers():
    def lm_arm(own, prefix, future):
        return {"final": {"loss": own}, "prefix_loss": prefix, "future_fraction": future}
    lm = {"lm-causal": lm_arm([1.5, 1.52, 1.49], [1.5, 1.52, 1.49], [0.0, 0.0, 0.0]),
          "lm-no-mask": lm_arm([0.05, 0.04, 0.06], [4.1, 3.9, 4.3], [0.4, 0.45, 0.38])}
    pad = {"padding": {"pads": [0, 64], "change_on": [[0, 0, 0], [1e-7, 2e-7, 0]],
                       "change_off": [[0, 0, 0], [1.5, 1.7, 1.9]]}}
    found = masks.verdicts(lm, pad)
    assert [v["verdict"] for v in found] == ["holds"] * 4
    # the same numbers with the arms swapped contradict every LM claim
    swapped = masks.verdicts({"lm-causal": lm["lm-no-mask"], "lm-no-mask": lm["lm-causal"]}, None)
    assert [v["verdict"] for v in swapped] == ["does not hold"] * 3
    assert masks.verdicts({"lm-causal": None, "lm-no-mask": None}, None) == []


@pytest.mark.slow
def test_masks_quick(tmp_path):
    summary = masks.main(["--quick", "--out", str(tmp_path)])
    for name in ("summary.json", "table.md", "lm_curves.png", "causality_gradients.png", "padding.png"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["seeds"] == [0, 1, 2] and saved["verdicts"] == summary["verdicts"]
    arms = saved["arms"]
    assert arms["lm-causal"]["future_fraction"] == [0.0, 0.0, 0.0]
    assert min(arms["lm-no-mask"]["future_fraction"]) > 0
    assert np.shape(arms["lm-causal"]["gradient_map"]) == (masks.SEQ_LEN, masks.SEQ_LEN)
    assert arms["lm-causal"]["sample"].startswith(masks.PROMPT)
    padding = arms["pad-seq2seq"]["padding"]
    assert max(map(max, padding["change_on"])) < 1e-4 < min(padding["change_off"][-1])
    found = {v["claim"].split(" (")[0]: v["verdict"] for v in saved["verdicts"]}
    assert found["the padding mask makes outputs independent of padding"] == "holds"
    assert all(v in ("holds", "does not hold", "inconclusive") for v in found.values())
