"""Bad input fails at once, in one line naming what to fix, and leaves the workdir usable;
the evaluation metrics compute what they claim (torchtext's BLEU, the tutorial's tokens)."""

import dataclasses
import json
import math

import pytest

from experiments import common, train
from experiments.config import ExperimentConfig, preset

# A model and data small enough that a run is a few seconds of compiling.
TINY = ["model.d_model=16", "model.num_heads=2", "model.num_layers=1", "model.d_ff=32", "num_examples=64",
        "batch_size=16", "max_len=6", "log_every=1", "eval_every=2", "checkpoint_every=2"]


def run_train(argv, capsys):
    """(exit code, stderr) of ``experiments.train.main(argv)``."""
    try:
        code = train.main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("experiments.train: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


def test_short_run_with_the_presets_warmup_fails_in_one_line_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    code, err = run_train(["--task", "reverse", "--workdir", str(run), "steps=20"], capsys)
    assert_one_line_error(code, err, "warmup_steps=50", "steps=20", "warmup_steps=")
    assert not run.exists()
    run.mkdir()  # an existing (empty) workdir stays empty
    run_train(["--task", "reverse", "--workdir", str(run), "steps=20"], capsys)
    assert list(run.iterdir()) == []


@pytest.mark.slow  # the one test here that trains
def test_failed_starts_then_a_corrected_retry_in_the_same_workdir(tmp_path, capsys):
    # One training run (compiling is most of a test's time) after two kinds of failed start.
    run = tmp_path / "run"
    argv = ["--task", "reverse", "--workdir", str(run), "steps=2", *TINY]
    assert run_train([*argv, "warmup_steps=10"], capsys)[0] == 2  # caught before writing anything
    assert not run.exists()
    # What a start that failed after writing its config leaves (the old code did so for steps=20,
    # and a failure past the checks still can): config.json, no checkpoint, no metrics.
    run.mkdir()
    (run / "config.json").write_text(preset("reverse").override(["steps=2000", "batch_size=7"]).to_json())
    (run / "checkpoints").mkdir()
    (run / "metrics.jsonl").write_text("")
    code, err = run_train([*argv, "warmup_steps=1"], capsys)
    assert code == 0, err
    assert common.load_config(run).steps == 2 and common.load_config(run).warmup_steps == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]

    # This run took steps: another configuration is refused, in one line, and changes nothing.
    before = (run / "config.json").read_text()
    code, err = run_train([*argv, "warmup_steps=1", "seed=1"], capsys)
    assert_one_line_error(code, err, "different configuration", "seed: 0 there, 1 here")
    assert (run / "config.json").read_text() == before


def test_reconfiguring_drops_tokenizers_the_new_config_would_make_differently(tmp_path):
    cfg = preset("multi30k").override(["vocab_size=400"])
    (tmp_path / "config.json").write_text(cfg.to_json())
    for name in ("spm_de.model", "spm_en.model", "spm_de.vocab"):
        (tmp_path / name).write_text("x")
    train.clear_stale_tokenizers(tmp_path, cfg.override(["steps=500"]))  # tokenizers unaffected: kept
    assert (tmp_path / "spm_de.model").exists()
    train.clear_stale_tokenizers(tmp_path, cfg.override(["vocab_size=800"]))
    assert not list(tmp_path.glob("spm_*"))


def test_a_started_run_resumes_under_another_exec_config_but_not_another_model(tmp_path):
    """How a model runs (``exe.*``) may change between a run and its resumption; what it is may not."""
    cfg = preset("reverse")
    (tmp_path / "config.json").write_text(cfg.to_json())
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')  # the run took a step
    assert train.plan_workdir(tmp_path, cfg) == "resume"
    assert train.plan_workdir(tmp_path, cfg.override(["exe.scan_layers=False", "exe.remat=False",
                                                       "exe.attention_impl='blockwise'"])) == "resume"
    with pytest.raises(ValueError, match=r"model\.d_model: 64 there, 32 here"):
        train.plan_workdir(tmp_path, cfg.override(["model.d_model=32"]))


def test_an_old_config_json_with_exec_fields_in_the_model_still_loads():
    """Runs saved before ExecConfig kept scan_layers, remat, ... among the model fields."""
    raw = json.loads(preset("reverse").to_json())
    raw.pop("exe")
    raw["model"].update(scan_layers=False, remat=True, attention_impl="blockwise", compute_dtype="float32")
    cfg = ExperimentConfig.from_json(json.dumps(raw))
    assert cfg.model == preset("reverse").model
    assert (cfg.exe.scan_layers, cfg.exe.remat, cfg.exe.attention_impl) == (False, True, "blockwise")


@pytest.mark.parametrize("override, key", [("steps=abc", "steps"), ("learning_rate='fast'", "learning_rate"),
                                           ("clip_norm=none", "clip_norm"), ("steps=True", "steps"),
                                           ("model.d_model=abc", "model.d_model"),
                                           ("exe.scan_layers=3", "exe.scan_layers")])
def test_wrong_typed_override_names_the_key(tmp_path, capsys, override, key):
    run = tmp_path / "run"
    code, err = run_train(["--task", "reverse", "--workdir", str(run), override], capsys)
    assert_one_line_error(code, err, f"{key}=", "must be of type")
    assert not run.exists()


def test_a_bad_init_from_fails_before_writing(tmp_path, capsys):
    run = tmp_path / "run"
    code, err = run_train(["--task", "reverse", "--workdir", str(run), f"init_from={tmp_path / 'nowhere'}"], capsys)
    assert_one_line_error(code, err, "init_from=", "no config.json")
    assert not run.exists()


# (field, an invalid value, a valid value of the same field); extra fields make the case.
FIELD_CASES = [
    ("steps", 0, 1, {"warmup_steps": 0}),
    ("warmup_steps", 2000, 1999, {"steps": 2000}),
    ("warmup_steps", -1, 0, {}),
    ("warmup_steps", 0, 1, {"optimizer": "paper", "learning_rate": 2.0}),
    ("learning_rate", 0.0, 1e-3, {"min_learning_rate": 0.0}),
    ("learning_rate", float("nan"), 1e-3, {"min_learning_rate": 0.0}),
    ("min_learning_rate", -1e-5, 0.0, {}),
    ("min_learning_rate", 2e-3, 1e-3, {"learning_rate": 1e-3}),
    ("batch_size", 0, 1, {}),
    ("batch_tokens", -1, 0, {}),
    ("batch_tokens", 1024, 0, {"task": "reverse"}),
    ("seq_len", 0, 1, {}),
    ("eval_every", 0, 1, {}),
    ("checkpoint_every", 0, 1, {}),
    ("log_every", 0, 1, {}),
    ("eval_batches", -1, 0, {}),
    ("beam_size", 0, 1, {}),
    ("length_penalty", -0.1, 0.0, {}),
    ("label_smoothing", 1.0, 0.99, {}),
    ("label_smoothing", -0.1, 0.0, {}),
    ("max_minutes", -1.0, 0.0, {}),
    ("clip_norm", 0.0, None, {}),
    ("clip_norm", -1.0, 0.5, {}),
    ("accumulate_steps", 0, 1, {}),
    ("weight_decay", -0.1, 0.0, {}),
    ("weight_decay", 0.1, 0.0, {"optimizer": "paper", "learning_rate": 2.0}),
    ("weight_decay_rule", "all", "matrices", {}),
    ("adam_eps", 0.0, 1e-8, {}),
    ("beta2", 1.0, 0.999, {}),
    ("beta2", 0.0, 0.5, {}),
    ("vocab_size", 3, 16, {}),
    ("max_tokens", 0, 1, {}),
    ("num_symbols", 0, 1, {"task": "reverse"}),
    ("min_len", 0, 1, {}),
    ("min_len", 2, 3, {"task": "add"}),
    ("max_len", 3, 4, {"min_len": 4}),
    ("num_examples", 0, 1, {"task": "copy"}),
    ("num_examples", -1, 0, {"task": "multi30k"}),
    ("seed", -1, 0, {}),
    ("steps", 1.5, 2, {"warmup_steps": 0}),
    ("model", {"d_model": 64}, ExperimentConfig().model, {}),
    ("exe", {"scan_layers": False}, ExperimentConfig().exe, {}),
]


@pytest.mark.parametrize("name, bad, good, extra", FIELD_CASES,
                         ids=[f"{c[0]}={c[1]!r}" for c in FIELD_CASES])
def test_each_field_is_checked_at_construction(name, bad, good, extra):
    ExperimentConfig(**extra, **{name: good})
    with pytest.raises(ValueError) as e:
        ExperimentConfig(**extra, **{name: bad})
    message = str(e.value)
    assert message.startswith(f"{name}=") and "\n" not in message


def test_every_field_has_a_check_case():
    # task and optimizer were checked before; init_from is checked by experiments.train (it must exist).
    covered = {c[0] for c in FIELD_CASES} | {"task", "optimizer", "init_from"}
    assert covered == {f.name for f in dataclasses.fields(ExperimentConfig)}


def test_warmup_message_suggests_the_override():
    with pytest.raises(ValueError, match=r"override it too, e\.g\. warmup_steps=2$"):
        ExperimentConfig(steps=20)


# ---------------------------------------------------------------- metrics


def test_token_bleu_is_torchtexts_bleu_score():
    # torchtext.data.metrics.bleu_score's documented example (torchtext computes in float32).
    candidates = [["My", "full", "pytorch", "test"], ["Another", "Sentence"]]
    references = [[["My", "full", "pytorch", "test"], ["Completely", "Different"]], [["No", "Match"]]]
    assert common.token_bleu(candidates, references) == pytest.approx(0.8408964276313782, abs=1e-7)
    with pytest.raises(ValueError, match="whitespace"):
        common.token_bleu([["a b"]], [[["a", "b"]]])


def test_tutorial_bleu_scores_lowercased_spacy_tokens():
    assert common.tutorial_tokens("A man isn't riding, he's walking.") == \
        ["a", "man", "is", "n't", "riding", ",", "he", "'s", "walking", "."]
    # 10 hypothesis tokens, 11 reference tokens; matches n=1..4: 9/10, 7/9, 5/8, 3/7.
    ref = "A man in a red shirt is riding a horse."
    expected = math.exp(1 - 11 / 10) * (9 / 10 * 7 / 9 * 5 / 8 * 3 / 7) ** 0.25
    assert common.tutorial_bleu(["A man in a red shirt rides a horse."], [ref]) == pytest.approx(expected, abs=1e-12)
    # Case does not count, and "horse." is two tokens as in the reference.
    shouted = "A MAN IN A RED SHIRT rides a horse."
    assert common.tutorial_bleu([shouted], [ref]) == pytest.approx(expected, abs=1e-12)
    score, signature = common.sacrebleu_score([shouted], [ref])
    assert score < 100 * expected and "case:mixed" in signature and "tok:13a" in signature
    assert json.loads(json.dumps({"s": signature}))  # a plain string for eval.json
