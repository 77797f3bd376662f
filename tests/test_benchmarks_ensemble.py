"""benchmarks/ensemble.py: S members in one vmapped jit vs a loop of S jitted steps (no timing assertions)."""

import pytest

import jformer
from benchmarks import ensemble as bench

TINY = jformer.TransformerConfig(vocab_size=32, d_model=16, num_heads=2, num_layers=1, d_ff=32, dropout_rate=0.0,
                                 norm_position="pre", positions="learned", max_len=8, pad_id=None)


@pytest.mark.slow  # compiles two ensemble steps and a single step
def test_ensemble_benchmark_has_a_row_per_member_count():
    rows = bench.ensemble_table((1, 2), cfg=TINY, batch_size=2, seq_len=8, repeats=1)
    assert [r["S"] for r in rows] == [1, 2]
    assert rows[0]["params_per_member"] == rows[1]["params_per_member"] > 0
    for r in rows:
        assert r["vmap_s"] > 0 and r["loop_s"] > 0 and r["vmap_mib"] > 0 and r["loop_mib"] > 0
    table = bench.markdown(rows).splitlines()
    assert len(table) == 2 + 2  # header, rule, one row per S
    assert [line.split("|")[1].strip() for line in table[2:]] == ["1", "2"]
