"""experiments/studies/prepost: divergence accounting and per-layer gradient norms on known answers,
and the study end to end (--quick)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.studies import prepost


def test_outcomes_count_diverged_and_failed_members():
    final = [2.0, float("nan"), 3.5, 1.5, float("inf")]
    train_loss = [{"step": 1, "loss": [4.0, 4.0, 4.0, 4.0, 4.0]},
                  {"step": 2, "loss": [3.0, 3.0, 3.0, float("nan"), 3.0]}]  # member 3 blew up mid-run
    out = prepost.outcomes(final, train_loss, unigram=3.3)
    assert out["values"] == [2.0, "diverged", 3.5, "diverged", "diverged"]
    assert out["diverged"] == [False, True, False, True, True]
    assert out["failed"] == [False, False, True, False, False]  # finite but no better than unigram
    assert prepost.capped(out["values"], 4.0) == [2.0, 4.0, 3.5, 4.0, 4.0]
    assert prepost.capped([5.0], 4.0) == [4.0]
    assert prepost.format_cell(out["values"], 3.3) == "2.750 ± 1.061 [3 diverged, 1 ≥ unigram]"


def test_verdict_with_divergence():
    cap = math.log(65)
    v = prepost.verdict_with_divergence("warmup < none", "warmup", [2.0, 2.1, 1.9], "none",
                                        ["diverged", "diverged", float("nan")], metric="loss", cap=cap)
    assert v["verdict"] == "holds" and v["diverged"] == [0, 3]
    assert "none 3/3" in v["measured"]
    # no divergence: the plain rule, untouched
    same = prepost.verdict_with_divergence("a < b", "a", [1.0, 1.1, 0.9], "b", [2.0, 2.1, 1.9], metric="m", cap=cap)
    assert same["verdict"] == "holds" and same["diverged"] == [0, 0]
    mixed = prepost.verdict_with_divergence("a < b", "a", ["diverged", 2.0, 2.0], "b", [2.0, 2.1, 2.0],
                                            metric="m", cap=cap)
    assert mixed["verdict"] == "inconclusive" and mixed["diverged"] == [1, 0]


def test_layer_gradient_norms_known_answer():
    """loss = Σ_l (l+1) · Σ W_l + Σ_l l · Σ b_l  ->  ‖∇W_l‖ = (l+1)·sqrt(6), ‖∇ layer l‖ = sqrt(6 (l+1)² + 3 l²)."""
    L = 4
    params = {"decoder": {"layers": {"ffn": {"wo": {"kernel": jnp.ones((L, 2, 3))}}, "b": jnp.ones((L, 3))}},
              "head": jnp.ones(5)}
    w = jnp.arange(1.0, L + 1)

    def loss(p, scale):
        layers = p["decoder"]["layers"]
        return scale * (jnp.sum(w[:, None, None] * layers["ffn"]["wo"]["kernel"])
                        + jnp.sum((w - 1)[:, None] * layers["b"]) + jnp.sum(p["head"]))

    out = jax.jit(lambda p: prepost.layer_gradient_norms(loss, p, 1.0, leaves={"ffn_wo": ("ffn", "wo", "kernel")}))(params)
    l = np.arange(L)
    np.testing.assert_allclose(out["ffn_wo"], (l + 1) * np.sqrt(6), rtol=1e-6)
    np.testing.assert_allclose(out["layer"], np.sqrt(6 * (l + 1) ** 2 + 3 * l ** 2), rtol=1e-6)


def test_member_grid_pairs_seeds():
    grid = prepost.member_grid(5, (1e-3, 1e-2), [0, 1, 2])
    assert len(grid) == 2 * 2 * 3
    assert grid[0] == {"warmup": 5, "lr": 1e-3, "seed": 0} and grid[-1] == {"warmup": 0, "lr": 1e-2, "seed": 2}
    assert [m["seed"] for m in grid] == [0, 1, 2] * 4


@pytest.mark.slow
def test_prepost_quick(tmp_path):
    summary = prepost.main(["--quick", "--out", str(tmp_path)])
    for name in ("summary.json", "table.md", "grad_norm_init.png", "lr_sweep.png", "train_curves.png"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["seeds"] == [0, 1, 2] and saved["verdicts"] == summary["verdicts"]
    arm = saved["arms"]["post-L2"]
    assert len(arm["final"]["loss"]) == len(arm["grid"]) == 2 * 3 * 3  # {warmup, none} x 3 lrs x 3 seeds
    assert sorted(set(arm["hparams"]["warmup"])) == [0, saved["settings"]["warmup"]]
    assert np.asarray(saved["arms"]["grad-pre-L2"]["ffn_wo"]).shape == (2, 3)  # [layers, seeds]
    cells = saved["outcomes"]["pre-L2"]
    assert len(cells) == 6 and all(len(c["values"]) == 3 for c in cells.values())
    assert saved["divergence"]["post-L2"]["members"] == 18
    assert all(v["verdict"] in ("holds", "does not hold", "inconclusive") for v in saved["verdicts"])
    # a rerun loads every finished arm (and the gradient norms) instead of computing them again
    again = prepost.main(["--quick", "--out", str(tmp_path)])
    assert again["arms"]["post-L2"]["final"] == summary["arms"]["post-L2"]["final"]
