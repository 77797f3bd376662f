"""experiments/nbody.py end to end with a stand-in model registry (the real one is jformer.equivariant)."""

import itertools
import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import nbody as exp
from experiments.studies import common


def _linear_init(key):
    return {"c": jnp.zeros(())}


def _linear(params, pos, vel, charge, mask):
    """pred = x + c v: exactly rotation-equivariant."""
    return pos + params["c"] * vel


def _shifted_init(key):
    return {"c": jnp.zeros(()), "b": jnp.array([0.3, -0.2, 0.1])}


def _shifted(params, pos, vel, charge, mask):
    """pred = x + c v + b: a fixed vector b breaks rotation equivariance."""
    return pos + params["c"] * vel + params["b"]


REGISTRY = {"linear": (_linear_init, _linear), "shifted": (_shifted_init, _shifted)}


def _argv(tmp_path, out):
    return ["--quick", "--seeds", "2", "--models", "linear,shifted", "--out", str(tmp_path / out),
            "--data-dir", str(tmp_path / "data"), "--epochs", "3"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nbody")
    return tmp, exp.run(_argv(tmp, "full"), registry=REGISTRY)


def test_summary_fields_and_outputs(full_run):
    tmp, summary = full_run
    out = tmp / "full"
    saved = json.loads((out / "summary.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["not_run"] == []
    assert saved["settings"]["data"]["protocol"] == "egnn" and saved["settings"]["epochs"] == 3
    assert saved["published"]["egnn"] == 0.0071 and "versions" in saved and saved["wall_seconds"] > 0
    for name in ("linear", "shifted"):
        arm = saved["arms"][name]
        assert len(arm["test_mse"]) == 2 and all(np.isfinite(arm["test_mse"]))
        assert arm["steps"] == 3 * arm["steps_per_epoch"] == 6          # 200 trajectories / batch 100
        assert arm["seconds_per_epoch"] is None or arm["seconds_per_epoch"] > 0
        assert len(arm["equivariance"]) == 2 and len(arm["rotation_sweep"]["angles"]) == 36
        lines = (out / "models" / f"{name}.metrics.jsonl").read_text().splitlines()
        assert any("val_mse" in json.loads(x) for x in lines)
    for png in ("learning_curves.png", "rotation_sweep.png", "equivariance.png"):
        assert (out / png).stat().st_size > 0
    table = (out / "table.md").read_text()
    assert "linear" in table and "0.0819" in table and "test MSE" in table
    # the equivariant stand-in is equivariant, the shifted one is not
    assert max(e["relative"] for e in saved["arms"]["linear"]["equivariance"]) < 1e-8
    assert min(e["relative"] for e in saved["arms"]["shifted"]["equivariance"]) > 1e-2


def test_resume_after_interruption_gives_the_same_numbers(full_run, monkeypatch):
    tmp, summary = full_run
    ticks = itertools.count()
    monkeypatch.setattr(common.Study, "out_of_time", lambda self: next(ticks) > 4)   # stop mid-arm
    first = exp.run(_argv(tmp, "resumed"), registry=REGISTRY)
    assert first["not_run"]                                                         # interrupted
    assert any((tmp / "resumed" / "checkpoints").iterdir())
    monkeypatch.undo()
    resumed = exp.run(_argv(tmp, "resumed"), registry=REGISTRY)
    assert resumed["not_run"] == []
    for name in ("linear", "shifted"):
        a, b = summary["arms"][name], resumed["arms"][name]
        np.testing.assert_allclose(b["test_mse"], a["test_mse"], rtol=1e-6)
        np.testing.assert_allclose([c["val_mse"] for c in b["curves"]], [c["val_mse"] for c in a["curves"]], rtol=1e-6)


def _examples(n=4, seed=0):
    rng = np.random.default_rng(seed)
    pos = rng.normal(size=(n, 5, 3)).astype(np.float32)
    vel = rng.normal(size=(n, 5, 3)).astype(np.float32)
    return {"pos": pos, "vel": vel, "charge": rng.choice([-1.0, 1.0], (n, 5)).astype(np.float32),
            "mask": np.ones((n, 5), bool), "target": pos + 0.7 * vel}


def test_rotation_sweep_separates_equivariant_from_not():
    ex = _examples()
    equivariant = lambda pos, vel, charge, mask: pos + 0.7 * vel                    # noqa: E731
    shifted = lambda pos, vel, charge, mask: pos + 0.7 * vel + np.float32([0.5, 0.0, 0.2])  # noqa: E731
    good = exp.rotation_sweep(equivariant, ex)
    bad = exp.rotation_sweep(shifted, ex)
    assert good["pred"].shape == (36, 5, 3) and good["angles"][1] == 10.0
    assert good["equivariance_mse"] < 1e-10
    np.testing.assert_allclose(good["pred"], good["truth"], atol=1e-5)              # traces the rotated truth
    assert bad["equivariance_mse"] > 1e-2
    assert exp.equivariance_error(equivariant, ex)["relative"] < 1e-10
    assert exp.equivariance_error(shifted, ex)["relative"] > 1e-2


def test_rotations_are_proper():
    R = exp.random_rotations(50, seed=1)
    np.testing.assert_allclose(np.einsum("bij,bkj->bik", R, R), np.broadcast_to(np.eye(3), R.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
    np.testing.assert_allclose(exp.rotation((0, 0, 1), 90) @ [1.0, 0, 0], [0, 1.0, 0], atol=1e-12)


def test_bad_model_name_is_reported(tmp_path):
    with pytest.raises(SystemExit, match="unknown"):
        exp.run(["--quick", "--models", "nope", "--out", str(tmp_path)], registry=REGISTRY)


def test_paper_protocol_runs(tmp_path):
    summary = exp.run(["--quick", "--protocol", "paper", "--seeds", "1", "--models", "linear", "--epochs", "1",
                       "--out", str(tmp_path / "paper"), "--data-dir", str(tmp_path / "data")], registry=REGISTRY)
    assert summary["settings"]["data"]["protocol"] == "paper" and summary["settings"]["data"]["delta_frames"] == 5
    assert np.isfinite(summary["arms"]["linear"]["test_mse"]).all()
    assert "reconstructed" in (tmp_path / "paper" / "table.md").read_text()
