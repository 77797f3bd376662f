"""The benchmark suite's peers build the same network, train, and are measured as the suite does.

Tiny versions of the workloads keep this fast; the real sizes run in
``python -m benchmarks.suite`` (never timed here).
"""

import dataclasses
import math

import numpy as np
import pytest

from benchmarks import run, suite
from benchmarks.harness import PEERS
from benchmarks.workloads import WORKLOADS, make_batch

TINY = {
    "lm": dataclasses.replace(WORKLOADS["lm-small"], name="tiny-lm", vocab=64, d_model=32, heads=4, layers=2,
                              length=16, batch=2, d_ff=128),
    "s2s": dataclasses.replace(WORKLOADS["s2s-small"], name="tiny-s2s", vocab=64, d_model=32, heads=4,
                               layers=2, decoder_layers=1, length=12, batch=4, d_ff=64),
    "decode": dataclasses.replace(WORKLOADS["decode"], name="tiny-decode", vocab=64, d_model=32, heads=4,
                                  layers=1, length=8, batch=2, d_ff=128, new_tokens=8),
    "long": dataclasses.replace(WORKLOADS["long-4k"], name="tiny-long", d_model=32, heads=4, length=300),
}
# torch-compile takes minutes to compile; jformer's seq2seq training is tested in test_training.py,
# the other peers' s2s builds run in the suite itself.
TRAIN_PEERS = ["jformer", "flax-nnx", "flax-linen", "equinox", "torch-eager"]


def test_parameter_count_formula_matches_a_hand_count():
    w = TINY["lm"]  # V 64, D 32, T 16, L 2, F 128
    D, F = 32, 128
    layer = 4 * (D * D + D) + (D * F + F) + (F * D + D) + 4 * D
    assert w.num_params == 64 * D + 16 * D + 2 * layer + 2 * D + (D * 64 + 64)
    assert WORKLOADS["lm-small"].num_params == 3_356_416


@pytest.mark.slow  # a benchmark run of every peer (compiles and trains each)
@pytest.mark.parametrize("peer,kind", [(p, "lm") for p in TRAIN_PEERS] + [("torch-eager", "s2s")])
def test_peers_build_the_architecture_and_train(monkeypatch, peer, kind):
    w = TINY[kind]
    monkeypatch.setitem(WORKLOADS, w.name, w)
    out = run.measure(peer, w.name, steps=3, warmup=0)  # asserts the parameter count itself
    assert out["params"] == w.num_params
    assert out["loss_last"] < out["loss_first"]             # AdamW steps on one batch lower its loss
    assert abs(out["loss_first"] - math.log(w.vocab)) < 1.0  # a fresh model is near uniform
    assert out["step_s"] > 0 and out["forward_s"] > 0 and out["tokens_per_s"] > 0
    assert out["page_faults_per_step"] >= 0


@pytest.mark.slow
def test_decode_peers_cached_and_full_agree(monkeypatch):
    w = TINY["decode"]
    monkeypatch.setitem(WORKLOADS, w.name, w)
    for peer in ("jformer", "flax-linen"):
        out = run.measure(peer, w.name, steps=1, warmup=0)
        assert out["cached_equals_full"] == 1.0, peer
    assert "full_s" in run.measure("torch-eager", w.name, steps=1, warmup=0)


@pytest.mark.slow
def test_long_attention_peers_agree_on_the_output_sum(monkeypatch):
    """The same layer in jformer's blockwise and reference paths: identical sums of outputs."""
    w = TINY["long"]
    monkeypatch.setitem(WORKLOADS, w.name, w)
    module = __import__("benchmarks.peers.jformer_peer", fromlist=["build"])
    sums = [module.build(w, make_batch(w), variant).forward() for variant in (None, "reference")]
    np.testing.assert_allclose(sums[0], sums[1], rtol=1e-5)


def test_a_wrong_parameter_count_is_an_error(monkeypatch):
    w = dataclasses.replace(TINY["lm"], name="tiny-wrong")
    monkeypatch.setitem(WORKLOADS, w.name, w)
    monkeypatch.setattr(type(w), "num_params", property(lambda self: 1))
    with pytest.raises(AssertionError, match="parameters"):
        run.measure("jformer", w.name, steps=1, warmup=0)


def test_schedule_interleaves_and_rotates_peers():
    plan = suite.schedule(["lm-small", "decode"], None, rounds=2)
    first = [p for r, w, p in plan if r == 0 and w == "lm-small"]
    second = [p for r, w, p in plan if r == 1 and w == "lm-small"]
    assert sorted(first) == sorted(second) and first != second and second == first[1:] + first[:1]
    assert {p for _, w, p in plan if w == "decode"} <= set(PEERS)


def test_summary_flags_rounds_that_disagree_and_reports_ratios():
    rows = [{"round": r, "workload": "lm-small", "peer": p, "params": 1, "step_s": s, "forward_s": 0.1,
             "compile_s": 1.0, "peak_mb": 10.0, "tokens_per_s": 4096 / s, "train_flops": 1e9,
             "page_faults_per_step": 1000.0 * r}
            for r, p, s in ((0, "jformer", 1.0), (1, "jformer", 1.02), (0, "torch-eager", 2.0),
                            (1, "torch-eager", 2.6))]
    summary = suite.summarize(rows)
    assert summary["lm-small", "torch-eager"]["spread"] == pytest.approx(0.3)
    text = suite.markdown(summary, {"peak_gflops": 10.0, "jax_gflops": 10.0, "torch_gflops": 9.0}, [], "hdr")
    assert "| torch-eager | 2.300 | 2.28 |" in text            # median over rounds, ratio to jformer
    assert "| 10 | 500 | 30% |" in text                        # peak MB, median page faults, spread
    assert "lm-small/torch-eager (30%)" in text and "lm-small/jformer" not in text.split("10%:")[1]


def test_run_json_passes_the_environment_to_the_child(monkeypatch, tmp_path):
    (tmp_path / "echo_env.py").write_text(
        "import json, os\nprint(json.dumps({'tunables': os.environ.get('GLIBC_TUNABLES')}))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    # 600 s: only a guard against a hung child (a loaded machine can take a while to start Python).
    assert suite.run_json(["echo_env"], 600, suite.HUGEPAGES_ENV) == [{"tunables": "glibc.malloc.hugetlb=1"}]
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert suite.run_json(["echo_env"], 600) == [{"tunables": None}]


@pytest.mark.slow
def test_dots_time_the_same_products_in_jax_and_torch():
    from benchmarks import dots

    assert dots.flops("mi,io->mo", (4, 3), (3, 5)) == 2 * 4 * 3 * 5
    assert dots.flops("bth,bsh->bts", (2, 4, 3), (2, 6, 3)) == 2 * 2 * 4 * 6 * 3
    rows = dots.measure(TINY["lm"], repeats=1)
    assert len(rows) == 4 * 3 + 2
    for r in rows:  # both libraries computed the same product (a wrong spec or operand would differ)
        assert r["max_abs_diff"] < 1e-3, r
        assert r["jax_gflops"] > 0 and r["torch_gflops"] > 0
    assert "**all, one layer**" in dots.markdown(rows, TINY["lm"])
