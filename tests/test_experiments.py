"""The experiment CLI end to end, on small slices: loss falls, checkpoints resume exactly,
evaluation and generation produce output."""

import dataclasses
import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import common, evaluate, generate, train
from experiments.config import ExperimentConfig, preset
from jformer import data


def metrics(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(workdir: pathlib.Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(workdir) if "loss" in r}


@pytest.mark.slow
def test_reverse_trains_resumes_exactly_and_evaluates(tmp_path, capsys):
    run = tmp_path / "reverse"
    argv = ["--task", "reverse", "--workdir", str(run), "steps=60", "log_every=10", "eval_every=30",
            "checkpoint_every=30", "num_examples=2000", "batch_size=32", "model.dropout_rate=0.1"]
    assert train.main(argv) == 0
    first = losses(run)
    assert first[60] < first[10]
    assert (run / "curves.png").stat().st_size > 0 and (run / "summary.json").exists()
    assert any((run / "tensorboard").iterdir())

    # Simulate a run killed after its step-30 checkpoint: drop the later checkpoint and resume.
    ckpts = run / "checkpoints"
    for d in ckpts.iterdir():
        if d.name.isdigit() and int(d.name) > 30:
            shutil.rmtree(d)
    assert train.main(argv) == 0
    resumed = losses(run)
    assert sorted(resumed) == sorted(first)
    for step in (40, 50, 60):  # same batches, same dropout keys
        assert resumed[step] == pytest.approx(first[step], abs=1e-6)

    assert evaluate.main(["--workdir", str(run), "--limit", "50"]) == 0
    results = json.loads((run / "eval.json").read_text())
    assert 0.0 <= results["greedy_token_accuracy"] <= 1.0 and results["val_loss"] > 0

    # A warm start from this run's best checkpoint, with a ~zero learning rate, keeps its weights:
    # the new run's validation loss is the source's best. Its time budget stops it after one step.
    best = min(r["val_loss"] for r in metrics(run) if "val_loss" in r)
    warm = tmp_path / "warm"
    assert train.main(["--task", "reverse", "--workdir", str(warm), "steps=50", "warmup_steps=1", "eval_every=50",
                       "num_examples=2000", "batch_size=32", "model.dropout_rate=0.1", "learning_rate=1e-30",
                       "min_learning_rate=0.0", f"init_from={run}", "max_minutes=0.0001"]) == 0
    summary = json.loads((warm / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["val_loss"] == pytest.approx(best, abs=1e-6)
    assert [p.name for p in (warm / "checkpoints").iterdir() if p.name.isdigit()] == ["1"]


def test_config_overrides_are_checked(tmp_path, capsys):
    for override, message in (("stepz=3", "unknown option 'stepz'"),
                              ("model.width=3", "unknown TransformerConfig options")):
        with pytest.raises(SystemExit) as e:
            train.main(["--task", "copy", "--workdir", str(tmp_path / "run"), override])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_optimizer_options_reach_the_optimizer():
    """adam_eps and weight_decay_rule go through common.make_optimizer; the nanoGPT presets
    use ε = 1e-8, decay on every matrix and embedding, and the GPT-2 init; the others are unchanged."""
    base = ExperimentConfig(task="shakespeare", steps=10, warmup_steps=0, learning_rate=0.1,
                            min_learning_rate=0.0, weight_decay=0.5, clip_norm=None)
    params = {"embedding": jnp.ones((4, 2)), "bias": jnp.ones(2)}
    for eps, rule in ((1e-8, "matrices"), (1e-9, "kernels")):
        cfg = dataclasses.replace(base, adam_eps=eps, weight_decay_rule=rule)
        tx, lr = common.make_optimizer(cfg, cfg.model)
        grads = {"embedding": jnp.zeros((4, 2)), "bias": jnp.full(2, 1e-9)}
        new = optax.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
        shrink = 1 - 0.1 * 0.5 if rule == "matrices" else 1.0
        np.testing.assert_allclose(new["embedding"], shrink, rtol=1e-6)
        np.testing.assert_allclose(new["bias"], 1 - float(lr(0)) * 1e-9 / (1e-9 + eps), rtol=1e-4)
    for name in ("shakespeare", "shakespeare-30min"):
        p = preset(name)
        assert (p.adam_eps, p.weight_decay_rule, p.model.init, p.model.use_bias) == (1e-8, "matrices", "gpt2", False)
        assert p.model.d_ff == 4 * p.model.d_model and p.beta2 == 0.99 and p.clip_norm == 1.0
    for name in ("multi30k", "reverse"):
        p = preset(name)
        assert (p.adam_eps, p.weight_decay_rule, p.model.init) == (1e-9, "kernels", "default")


def _have_multi30k() -> bool:
    try:
        return (data.default_data_dir() / "multi30k").exists()
    except FileNotFoundError:
        return False


needs_data = pytest.mark.skipif(not _have_multi30k(), reason="../shared/data not present")


@pytest.mark.slow
@needs_data
def test_shakespeare_lm_pipeline(tmp_path, capsys):
    run = tmp_path / "lm"
    assert train.main(["--task", "shakespeare", "--workdir", str(run), "steps=40", "log_every=5",
                       "eval_every=40", "checkpoint_every=20", "eval_batches=2", "warmup_steps=10", "model.num_layers=2",
                       "model.d_model=64", "model.d_ff=256"]) == 0
    lm = losses(run)
    assert lm[40] < lm[5]
    assert generate.main(["--workdir", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "80",
                          "--top-k", "5"]) == 0
    text = capsys.readouterr().out.strip().splitlines()
    assert "ROMEO:" in "\n".join(text) and len("\n".join(text)) > 60


@pytest.mark.slow
@needs_data
def test_multi30k_pipeline(tmp_path, capsys):
    run = tmp_path / "mt"
    # max_tokens=32: two length buckets (16, 32), so two train-step compiles rather than four.
    assert train.main(["--task", "multi30k", "--workdir", str(run), "steps=30", "log_every=5",
                       "eval_every=30", "checkpoint_every=30", "eval_batches=2", "num_examples=3000",
                       "vocab_size=400", "batch_tokens=1024", "max_tokens=32", "model.num_layers=1",
                       "model.d_model=64", "model.d_ff=128", "warmup_steps=10"]) == 0
    mt = losses(run)
    assert mt[30] < mt[5]
    assert (run / "spm_de.model").exists() and (run / "spm_en.model").exists()
    assert evaluate.main(["--workdir", str(run), "--limit", "16", "--beam-size", "2"]) == 0
    results = json.loads((run / "eval.json").read_text())
    assert {"val_loss", "val_perplexity", "step", "checkpoint_reason"} <= set(results)
    assert results["step"] == 30 and "validation loss" in results["checkpoint_reason"]
    for split in ("val", "test"):
        for setting in ("greedy", "beam2"):
            scores = results["translation"][split][setting]
            assert 0 <= scores["sacrebleu"] <= 100 and 0 <= scores["tutorial_bleu"] <= 1
            assert "tok:13a" in scores["sacrebleu_signature"] and scores["decode_seconds"] > 0
            hyps = (run / scores["hypotheses"]).read_text().splitlines()
            assert scores["hypotheses"] == f"hypotheses/{split}-{setting}.en" and len(hyps) == 16
    capsys.readouterr()
    assert generate.main(["--workdir", str(run), "--beam-size", "2", "Ein Hund läuft."]) == 0
    assert "->" in capsys.readouterr().out


def test_compare_runs_reports_mean_and_sample_sd(tmp_path):
    from experiments import compare_runs

    runs = []
    for i, final in enumerate([1.0, 2.0, 3.0]):
        run = tmp_path / f"s{i}"
        run.mkdir()
        rows = [{"step": 10, "val_loss": 4.0}, {"step": 20, "loss": 9.0}, {"step": 20, "val_loss": final}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(str(run))
    assert compare_runs.main(["--out", str(tmp_path / "out"), "a=" + ",".join(runs)]) == 0
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "**2.000 ± 1.000**" in table and (tmp_path / "out" / "compare.png").stat().st_size > 0
