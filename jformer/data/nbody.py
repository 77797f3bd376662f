"""Charged N-body trajectories (Kipf et al. 2018, NRI "charged"; the 3-D version of EGNN), in numpy.

Written from the published description of the reference simulators (ethanfetaya/NRI
``data/synthetic_sim.py`` ``ChargedParticlesSim`` and its 3-D variant in vgsatorras/egnn
``n_body_system/dataset``); nothing is copied. Vectorised over S trajectories at once.

The system. N particles of unit mass in 3-D, charges q_i ∈ {-1, +1} with probability 1/2
each, Coulomb forces with strength k (``interaction_strength``), no walls::

    F_i = clip( Σ_{j≠i} k q_i q_j (x_i - x_j) / |x_i - x_j|³ ,  -F_max, F_max )   (per component)

with ``F_max = 0.1 / dt`` (the reference's ``_max_F``): the *total* force on a particle is
clipped component-wise, which tames close encounters of opposite charges (|F| > 100 only
below r ≈ 0.1). Like charges repel (F_i along x_i - x_j when q_i q_j > 0). Clipping the totals
keeps Σ_i F_i = 0 for two particles but not in general, so total momentum is conserved exactly
only on unclipped steps; about half of the EGNN-protocol trajectories have at least one.

Initial state: x ~ N(0, loc_std²) per coordinate with ``loc_std = 1 · (N / 5)^(1/3)`` (EGNN's
scaling; 1 for five particles), v drawn isotropically and rescaled to norm ``vel_norm = 0.5``.
Positions beyond ``box_size = 5`` are reflected (and that velocity component turned inward)
once, at t = 0, as the reference does; after that there are no walls.

Integrator (the reference's "leapfrog", i.e. symplectic Euler, kick then drift)::

    v ← v + dt · F(x);   x ← x + dt · v          (dt = 0.001), repeated

Frame f (f = 0 .. n_frames - 1) is the state right after drift step (f + 1) · sample_freq,
and its velocity is the one that produced that drift. This is the reference's indexing (its
stored initial state is overwritten by the first sample), so EGNN's frames 30 → 40 at
``sample_freq = 100`` are steps 3,100 → 4,100: positions 1,000 steps ahead.

Protocols (``PROTOCOLS``):

* ``"egnn"`` (Satorras et al. 2021, Sec. 5.1): 3,000 train / 2,000 valid / 2,000 test
  trajectories of length 5,000 at sample_freq 100 (49 frames); input frame 30 (pos, vel,
  charges), target the positions at frame 40. Reported test MSE (Table 2, ``PUBLISHED_MSE``).
* ``"paper"`` (Fuchs et al. 2020, SE(3)-Transformer, Sec. 4.1: RECONSTRUCTED from the paper
  and its public loader, not the authors' exact data): the same simulator, a target 500
  steps (5 frames) ahead of the input, the target given relative to the input (x_T - x_0,
  v_T - v_0); training inputs start at a random frame per example and draw, evaluation
  inputs at frames spread evenly over the trajectory (``start = idx · last / count``).
  Sizes default to the EGNN protocol's so that the two share a budget.

Arrays: ``loc`` [S, T, N, 3], ``vel`` [S, T, N, 3], ``charges`` [S, N] (±1). The simulation
runs in float64; datasets are stored in float32 (what the models consume).

Caching (``load_dataset``): one ``.npz`` per (protocol parameters, seed), named by a hash
of the parameters, holding the parameters (JSON) and a SHA-256 of every array; a file
that does not open, whose parameters differ from the request, or whose arrays do not
match their hash raises a ``ValueError`` naming the file: it is never used silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import zipfile

import numpy as np

DT = 0.001
MAX_FORCE = 0.1 / DT  # the reference's _max_F: component-wise clip of each particle's total force
SPLITS = ("train", "valid", "test")
PUBLISHED_MSE = {"egnn": 0.0071, "gnn": 0.0107, "tfn": 0.0155, "se3_transformer": 0.0244,
                 "linear": 0.0819, "radial_field": 0.0104}  # Satorras et al. 2021, Table 2 (test MSE)
PROTOCOLS = {
    "egnn": {"n_particles": 5, "sizes": {"train": 3000, "valid": 2000, "test": 2000}, "length": 5000,
             "sample_freq": 100, "frame_in": 30, "frame_out": 40},
    "paper": {"n_particles": 5, "sizes": {"train": 3000, "valid": 2000, "test": 2000}, "length": 5000,
              "sample_freq": 100, "delta_frames": 5},
}
DEFAULT_CACHE = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "results" / "nbody" / "data"
_FORMAT = 1


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs i < j: I, J [P = N (N - 1) / 2]."""
    return np.triu_indices(n, 1)


def _forces_nts(x: np.ndarray, q: np.ndarray, pairs: tuple, k: float, max_force: float) -> tuple[np.ndarray, np.ndarray]:
    # Layout [N, 3, S] / [N, S]: every operation runs over long contiguous trajectory vectors
    # (5x faster than [S, N, 3] whose inner axis of 3 defeats numpy's vector loops). Only
    # elementwise operations in a fixed order (no einsum / BLAS, whose summation order may
    # depend on S): a trajectory's result cannot depend on the chunk it is simulated in.
    I, J = pairs
    diff = x[I] - x[J]                                              # [P, 3, S]: x_i - x_j for i < j
    r2 = diff[:, 0] * diff[:, 0] + diff[:, 1] * diff[:, 1] + diff[:, 2] * diff[:, 2]
    diff *= (k * q[I] * q[J] / (r2 * np.sqrt(r2)))[:, None]         # f_ij, the force of j on i
    f = np.zeros_like(x)
    for p, (i, j) in enumerate(zip(I, J)):  # each pair once: Newton's third law holds bit for bit
        f[i] += diff[p]
        f[j] -= diff[p]
    return np.clip(f, -max_force, max_force), (np.abs(f) > max_force).any(axis=(0, 1))


def forces(loc: np.ndarray, charges: np.ndarray, *, interaction_strength: float = 1.0,
           max_force: float = MAX_FORCE) -> tuple[np.ndarray, np.ndarray]:
    """Clipped Coulomb forces ``F`` [S, N, 3] and whether any component was clipped, [S] bool.

    ``F_i = clip(Σ_j k q_i q_j (x_i - x_j) / r_ij³, ±max_force)``; loc [S, N, 3], charges [S, N].
    Each pair term is computed once and added to i, subtracted from j, so before clipping
    Σ_i F_i = 0 up to summation rounding.
    """
    loc, charges = np.asarray(loc, np.float64), np.asarray(charges, np.float64)
    f, clipped = _forces_nts(np.ascontiguousarray(loc.transpose(1, 2, 0)), np.ascontiguousarray(charges.T),
                             _pairs(loc.shape[1]), interaction_strength, max_force)
    return f.transpose(2, 0, 1), clipped


def integrate(loc: np.ndarray, vel: np.ndarray, charges: np.ndarray, *, n_frames: int, sample_freq: int,
              dt: float = DT, interaction_strength: float = 1.0, max_force: float | None = None,
              chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``n_frames · sample_freq`` kick-drift steps from (loc, vel); returns the frames.

    Args:
      loc, vel: [S, N, 3] initial state (the inputs are not changed).
      charges: [S, N].
      max_force: the clip, default ``0.1 / dt`` (the reference's ``_max_F``).
      chunk: trajectories per pass (keeps the pair arrays in cache; the result does not
        depend on it: every operation is per trajectory).

    Returns:
      ``loc`` [S, n_frames, N, 3] and ``vel`` [S, n_frames, N, 3] (frame f: after drift step
      (f + 1) · sample_freq), and ``clip_steps`` [S] int: the steps whose force was clipped.
    """
    n_frames = _positive_int("n_frames", n_frames)
    sample_freq = _positive_int("sample_freq", sample_freq)
    dt = _positive_float("dt", dt)
    chunk = _positive_int("chunk", chunk)
    max_force = 0.1 / dt if max_force is None else _positive_float("max_force", max_force)
    loc, vel = np.asarray(loc, np.float64), np.asarray(vel, np.float64)
    charges = np.asarray(charges, np.float64)
    if loc.ndim != 3 or loc.shape[-1] != 3 or vel.shape != loc.shape or charges.shape != loc.shape[:2]:
        raise ValueError(f"need loc, vel [S, N, 3] and charges [S, N], got loc {loc.shape}, vel {vel.shape}, "
                         f"charges {charges.shape}")
    S, N, _ = loc.shape
    pairs = _pairs(N)
    out_loc = np.empty((S, n_frames, N, 3))
    out_vel = np.empty((S, n_frames, N, 3))
    clip_steps = np.zeros(S, np.int64)
    for lo in range(0, S, chunk):
        # copies (never views: a one-trajectory chunk is already contiguous), updated in place
        x = np.array(loc[lo:lo + chunk].transpose(1, 2, 0), order="C", copy=True)   # [N, 3, s]
        v = np.array(vel[lo:lo + chunk].transpose(1, 2, 0), order="C", copy=True)
        q = np.ascontiguousarray(charges[lo:lo + chunk].T)                # [N, s]
        for f in range(n_frames):
            for _ in range(sample_freq):
                F, clipped = _forces_nts(x, q, pairs, interaction_strength, max_force)
                v += dt * F    # kick with the force at the current positions,
                x += dt * v    # then drift with the new velocity (symplectic Euler)
                clip_steps[lo:lo + chunk] += clipped
            out_loc[lo:lo + chunk, f], out_vel[lo:lo + chunk, f] = x.transpose(2, 0, 1), v.transpose(2, 0, 1)
    return out_loc, out_vel, clip_steps


def initial_state(n_trajectories: int, n_particles: int = 5, *, seed: int, loc_std: float | None = None,
                  vel_norm: float = 0.5, box_size: float = 5.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw (loc [S, N, 3], vel [S, N, 3], charges [S, N]) as the reference does; a function of ``seed``.

    ``loc_std`` defaults to ``(N / 5)^(1/3)``; charges are ±1 with probability 1/2; velocities
    point uniformly on the sphere with norm ``vel_norm``; positions past ±``box_size`` are
    reflected once (the reference's only use of its box).
    """
    S = _positive_int("n_trajectories", n_trajectories)
    N = _positive_int("n_particles", n_particles)
    loc_std = _positive_float("loc_std", (N / 5) ** (1 / 3) if loc_std is None else loc_std)
    vel_norm = _positive_float("vel_norm", vel_norm)
    box_size = _positive_float("box_size", box_size)
    rng = np.random.default_rng(seed)
    charges = rng.choice(np.array([-1.0, 1.0]), size=(S, N))
    loc = rng.normal(size=(S, N, 3)) * loc_std
    vel = rng.normal(size=(S, N, 3))
    vel *= vel_norm / np.linalg.norm(vel, axis=-1, keepdims=True)
    over, under = loc > box_size, loc < -box_size
    loc = np.where(over, 2 * box_size - loc, np.where(under, -2 * box_size - loc, loc))
    vel = np.where(over, -np.abs(vel), np.where(under, np.abs(vel), vel))
    return loc, vel, charges


def simulate(n_trajectories: int, n_particles: int = 5, *, seed: int, length: int = 5000,
             sample_freq: int = 100, interaction_strength: float = 1.0, return_clip_steps: bool = False,
             **initial) -> tuple[np.ndarray, ...]:
    """``(loc [S, T, N, 3], vel [S, T, N, 3], charges [S, N])`` with T = length // sample_freq - 1.

    T is the reference's count (a trajectory of ``length`` steps keeps length/freq - 1
    samples). Deterministic in ``seed``; ``initial`` goes to ``initial_state``. With
    ``return_clip_steps`` a fourth array [S] counts the steps whose force was clipped.
    """
    length = _positive_int("length", length)
    sample_freq = _positive_int("sample_freq", sample_freq)
    if length % sample_freq or length // sample_freq < 2:
        raise ValueError(f"length must be a multiple of sample_freq giving >= 2 samples, got length={length}, "
                         f"sample_freq={sample_freq}")
    loc0, vel0, charges = initial_state(n_trajectories, n_particles, seed=seed, **initial)
    loc, vel, clips = integrate(loc0, vel0, charges, n_frames=length // sample_freq - 1, sample_freq=sample_freq,
                                interaction_strength=_positive_float("interaction_strength",
                                                                     interaction_strength))
    return (loc, vel, charges, clips) if return_clip_steps else (loc, vel, charges)


def energy(loc: np.ndarray, vel: np.ndarray, charges: np.ndarray, *, interaction_strength: float = 1.0) -> np.ndarray:
    """Total energy ``½ Σ_i |v_i|² + Σ_{i<j} k q_i q_j / r_ij`` per leading index: loc, vel [..., N, 3], charges
    [..., N] (broadcast against loc's leading axes, e.g. [S, 1, N] for [S, T, N, 3])."""
    diff = loc[..., :, None, :] - loc[..., None, :, :]
    r = np.sqrt((diff ** 2).sum(-1))
    n = loc.shape[-2]
    iu = np.triu_indices(n, 1)
    qq = charges[..., :, None] * charges[..., None, :]
    return 0.5 * (vel ** 2).sum((-1, -2)) + interaction_strength * (qq[..., iu[0], iu[1]] / r[..., iu[0], iu[1]]).sum(-1)


# ---------------------------------------------------------------- protocols and cache


def protocol_params(protocol: str, *, seed: int = 0, sizes: dict | None = None) -> dict:
    """The full parameter dict of a dataset (what the cache file is named by and checked against)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
    params = json.loads(json.dumps(PROTOCOLS[protocol]))
    for name, n in (sizes or {}).items():
        if name not in SPLITS:
            raise ValueError(f"sizes keys must be among {SPLITS}, got {name!r}")
        params["sizes"][name] = _positive_int(f"sizes[{name!r}]", n)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    params.update(protocol=protocol, seed=int(seed), dt=DT, max_force=MAX_FORCE, interaction_strength=1.0,
                  vel_norm=0.5, box_size=5.0, format=_FORMAT)
    return params


def _split_seed(seed: int, split: str) -> int:
    # independent streams per split: growing one split never changes another
    return int(np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(1)[0])


def _digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def generate_dataset(params: dict) -> dict:
    """``{f"{split}_{loc|vel|charges}": float32 array}`` for every split of ``params``."""
    out = {}
    for split in SPLITS:
        loc, vel, charges = simulate(params["sizes"][split], params["n_particles"], seed=_split_seed(params["seed"], split),
                                     length=params["length"], sample_freq=params["sample_freq"],
                                     interaction_strength=params["interaction_strength"],
                                     vel_norm=params["vel_norm"], box_size=params["box_size"])
        out.update({f"{split}_loc": loc.astype(np.float32), f"{split}_vel": vel.astype(np.float32),
                    f"{split}_charges": charges.astype(np.float32)})
    return out


def cache_path(params: dict, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return pathlib.Path(cache_dir or DEFAULT_CACHE) / f"nbody-{params['protocol']}-{key}.npz"


def save_dataset(path: str | os.PathLike, params: dict, arrays: dict) -> None:
    """Write ``arrays`` with ``params`` and their SHA-256 (atomically: temp file, then rename)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"params": params, "sha256": _digest(arrays)}, sort_keys=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, __meta__=np.array(meta), **arrays)
    tmp.replace(path)


def read_dataset(path: str | os.PathLike, params: dict | None = None) -> dict:
    """The arrays of a cache file, verified: parameters (when given) and content hash."""
    path = pathlib.Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["__meta__"]))
            arrays = {k: f[k] for k in f.files if k != "__meta__"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise ValueError(f"N-body cache file {path} is damaged or not a dataset ({type(e).__name__}: {e}); "
                         f"delete it to regenerate") from e
    if params is not None and meta.get("params") != params:
        raise ValueError(f"N-body cache file {path} holds parameters {meta.get('params')}, not the requested "
                         f"{params}; delete it to regenerate")
    if _digest(arrays) != meta.get("sha256"):
        raise ValueError(f"N-body cache file {path} is damaged: its arrays do not match the SHA-256 stored "
                         f"with them; delete it to regenerate")
    return arrays


def load_dataset(protocol: str = "egnn", *, seed: int = 0, sizes: dict | None = None,
                 cache_dir: str | os.PathLike | None = None) -> tuple[dict, dict]:
    """``(arrays, params)``: the protocol's splits, read from the cache or generated and cached.

    ``arrays[f"{split}_loc"]`` [S, T, N, 3], ``_vel`` [S, T, N, 3], ``_charges`` [S, N], float32.
    """
    params = protocol_params(protocol, seed=seed, sizes=sizes)
    path = cache_path(params, cache_dir)
    if path.exists():
        return read_dataset(path, params), params
    arrays = generate_dataset(params)
    save_dataset(path, params, arrays)
    return arrays, params


def examples(arrays: dict, params: dict, split: str, *, epoch_seed: int | None = None) -> dict:
    """Model inputs and targets of a split: ``pos``, ``vel`` [S, N, 3], ``charge`` [S, N], ``mask`` [S, N]
    (all True: fixed-size graphs), ``target`` [S, N, 3] (positions at the target frame).

    ``"egnn"``: frames ``frame_in`` → ``frame_out``. ``"paper"``: ``delta_frames`` ahead of a start
    frame drawn uniformly per example from ``epoch_seed`` (training), or spread evenly when
    ``epoch_seed`` is None (evaluation); also ``target_rel_pos`` = x_T - x_0 and ``target_rel_vel``
    = v_T - v_0 (the paper's regression targets).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    loc, vel, q = arrays[f"{split}_loc"], arrays[f"{split}_vel"], arrays[f"{split}_charges"]
    S, T = loc.shape[:2]
    idx = np.arange(S)
    if params["protocol"] == "egnn":
        t0, t1 = np.full(S, params["frame_in"]), np.full(S, params["frame_out"])
    else:
        last = T - params["delta_frames"]
        t0 = (np.random.default_rng(epoch_seed).integers(0, last, S) if epoch_seed is not None
              else idx * last // S)
        t1 = t0 + params["delta_frames"]
    out = {"pos": loc[idx, t0], "vel": vel[idx, t0], "charge": q, "mask": np.ones(q.shape, bool),
           "target": loc[idx, t1]}
    if params["protocol"] == "paper":
        out.update(target_rel_pos=loc[idx, t1] - loc[idx, t0], target_rel_vel=vel[idx, t1] - vel[idx, t0])
    return out
