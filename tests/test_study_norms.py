"""experiments/studies/norms: the helpers on known answers, and the study end to end (--quick)."""

import json

import jax
import numpy as np
import optax
import pytest

import jformer
from experiments.studies import norms
from jformer import data, ensemble, training


def test_configure_places_none_pre_ln():
    base = jformer.TransformerConfig(vocab_size=8, d_model=16, num_heads=2, num_layers=2, d_ff=32)
    assert (norms.configure(base, "none", "post").norm, norms.configure(base, "none", "post").norm_position) == \
        ("none", "pre")
    assert norms.configure(base, "batch", "post").norm_position == "post"


def test_pad_pairs_and_member_batches():
    table = norms.pad_pairs([([5, 6, 7], [7, 6, 5]), ([8], [8])], 4, 5)
    np.testing.assert_array_equal(table["src"], [[5, 6, 7, 0], [8, 0, 0, 0]])
    np.testing.assert_array_equal(table["tgt_in"], [[data.BOS, 7, 6, 5, 0], [data.BOS, 8, 0, 0, 0]])
    np.testing.assert_array_equal(table["tgt_out"], [[7, 6, 5, data.EOS, 0], [8, data.EOS, 0, 0, 0]])
    batch = norms.member_pair_batches(table, S=3, batch_size=6)
    b = batch(7)
    assert b["src"].shape == (3, 6, 4) and b["tgt_in"].shape == (3, 6, 5)
    np.testing.assert_array_equal(batch(7)["src"], b["src"])  # a pure function of the step


def test_bn_sites_order():
    stat = {"mean": np.zeros((3, 2, 4)), "var": np.ones((3, 2, 4))}
    state = {"decoder": {"layers": {"self_attn_norm": stat, "ffn_norm": stat, "cross_attn_norm": stat},
                         "final_norm": {"mean": np.zeros((3, 4)), "var": np.ones((3, 4))}},
             "encoder": {"layers": {"self_attn_norm": stat, "ffn_norm": stat}}}
    sites = norms.bn_sites(state)
    assert list(sites) == ["encoder 1 self_attn", "encoder 1 ffn", "encoder 2 self_attn", "encoder 2 ffn",
                           "decoder 1 self_attn", "decoder 1 cross_attn", "decoder 1 ffn", "decoder 2 self_attn",
                           "decoder 2 cross_attn", "decoder 2 ffn", "decoder final"]
    assert sites["decoder 2 ffn"]["mean"].shape == (3, 4)


def test_bn_fluctuation_known_batch_statistics():
    """Pre-LN without positions: the first BatchNorm's input is the token embedding E[token], so its
    batch statistics are the mean / variance of E over the batch's real (non-pad) tokens."""
    D = 8
    cfg = jformer.TransformerConfig(vocab_size=12, d_model=D, num_heads=2, num_layers=1, d_ff=16, dropout_rate=0.0,
                                    norm="batch", norm_position="pre", positions="none", scale_embeddings=False,
                                    max_len=6, pad_id=0)
    params = jax.jit(lambda k: jformer.init_lm(k, cfg))(jax.random.key(0))
    state = jformer.init_state(params, cfg)  # running statistics: mean 0, var 1
    ens = ensemble.stack([training.TrainState.create(params, optax.identity(), jax.random.key(1), state)])
    tokens = np.asarray([[3, 4, 5, 0, 0, 0], [7, 0, 0, 0, 0, 0], [11, 11, 2, 9, 0, 0]], np.int32)  # 0 = PAD
    f = norms.bn_fluctuation(ens, cfg, norms.lm_batch_state, [{"inputs": tokens[None], "targets": tokens[None]}])
    assert f["sites"] == ["decoder 1 self_attn", "decoder 1 ffn", "decoder final"]
    e = np.asarray(params["embed"]["token"]["embedding"], np.float64)[tokens[tokens != 0]]  # real tokens only
    mu, var = e.mean(0), e.var(0)
    np.testing.assert_allclose(f["mean_distance"]["decoder 1 self_attn"], [np.linalg.norm(mu) / D], rtol=1e-4)
    np.testing.assert_allclose(f["var_distance"]["decoder 1 self_attn"], [np.linalg.norm(var - 1) / D], rtol=1e-4)
    np.testing.assert_allclose(f["var_relative"]["decoder 1 self_attn"], [np.abs(var - 1).mean()], rtol=1e-4)
    assert f["trace"]["site"] == "decoder final" and len(f["trace"]["batch_var"]) == 1


@pytest.mark.slow
def test_norms_quick(tmp_path):
    summary = norms.main(["--quick", "--out", str(tmp_path)])
    for name in ("summary.json", "table.md", "val_loss.png", "bn_fluctuation.png", "bn_trace.png", "curves.png"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["seeds"] == [0, 1, 2] and saved["verdicts"] == summary["verdicts"]
    bn = saved["arms"]["lm-batch-post"]
    assert len(bn["gap"]["batch_stats"]) == 3 and "gap" not in saved["arms"]["lm-layer-post"]
    sites = bn["fluctuation"]["sites"]
    assert sites == ["decoder 1 self_attn", "decoder 1 ffn"]  # quick: 1 layer, Post-LN (no final norm)
    assert all(len(bn["fluctuation"]["var_relative"][s]) == 3 for s in sites)
    assert saved["arms"]["s2s-batch-post"]["fluctuation"]["sites"][0] == "encoder 1 self_attn"
    assert all(v["verdict"] in ("holds", "does not hold", "inconclusive") for v in saved["verdicts"])
    assert 0.3 < saved["settings"]["s2s"]["padding_fraction"]["src"] < 0.6
