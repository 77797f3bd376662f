"""The experiment CLI end to end, on small slices: loss falls, checkpoints resume exactly,
evaluation and generation produce output."""

import json
import pathlib
import shutil

import pytest

from experiments import evaluate, generate, train
from jformer import data


def metrics(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(workdir: pathlib.Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(workdir) if "loss" in r}


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

    # A warm start from this run's best checkpoint, with a zero learning rate, keeps its weights:
    # the new run's validation loss is the source's best. Its time budget stops it after one step.
    best = min(r["val_loss"] for r in metrics(run) if "val_loss" in r)
    warm = tmp_path / "warm"
    assert train.main(["--task", "reverse", "--workdir", str(warm), "steps=50", "warmup_steps=1", "eval_every=50",
                       "num_examples=2000", "batch_size=32", "model.dropout_rate=0.1", "learning_rate=0.0",
                       "min_learning_rate=0.0", f"init_from={run}", "max_minutes=0.0001"]) == 0
    summary = json.loads((warm / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["val_loss"] == pytest.approx(best, abs=1e-6)
    assert [p.name for p in (warm / "checkpoints").iterdir() if p.name.isdigit()] == ["1"]


def test_config_overrides_are_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown option 'stepz'"):
        train.main(["--task", "copy", "--workdir", str(tmp_path), "stepz=3"])
    with pytest.raises(ValueError, match="unknown TransformerConfig options"):
        train.main(["--task", "copy", "--workdir", str(tmp_path), "model.width=3"])


needs_data = pytest.mark.skipif(not (data.default_data_dir() / "multi30k").exists(),
                                reason="../shared/data not present")


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
    assert {"bleu_greedy", "bleu_beam2", "val_loss", "val_perplexity"} <= set(results)
    capsys.readouterr()
    assert generate.main(["--workdir", str(run), "--beam-size", "2", "Ein Hund läuft."]) == 0
    assert "->" in capsys.readouterr().out
