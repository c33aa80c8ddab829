"""``python -m mpibn golden``: reference files other backends are checked against.

Run on K ranks (``mpiexec -n K``, or the command relaunches itself), it
writes, for every scenario and rank, the inputs that rank holds and mpibn's
outputs for them, plus a JSON manifest that spells out the conventions::

    DIR/manifest.json                 format, version, conventions, scenarios
    DIR/<scenario>/rank<r>.npz        inputs and outputs of rank r

Inputs of a rank (``steps`` = 2 training steps, n_r = the rank's samples)::

    x, dy                 (2, n_r, C[, H, W])  scenario dtype (bfloat16: stored
                                               as float32, which holds it exactly)
    gamma, beta           (C,) float64 (values exact in float16)
    moving_mean0, moving_var0   (C,) float64 (exact in float32), the moving
                          statistics before step 0

Outputs (what ``verify`` compares; the manifest lists them per scenario)::

    y, dx                 (2, n_r, C[, H, W])  scenario dtype (bfloat16 as float32)
    dgamma, dbeta         (2, C) float64       this rank's share of the gradients
    batch_mean, batch_var (2, C) float64       group statistics (biased var); only
                                               where batch statistics are used
    moving_mean, moving_var (2, C) float64     after each step

A scenario's ``param_dtype`` is the dtype mpibn keeps gamma, beta and the
moving statistics in (``SyncBatchNorm(dtype=...)``): float64, or float32
for the mixed-precision scenarios (float16 or bfloat16 input with float32
parameters, as Keras' ``mixed_float16`` policy and Flax's ``param_dtype``
run). bfloat16 scenarios need ``ml_dtypes`` (optional): without it they
are left out of the standard table, and asking for one by name is an error.

Every rank draws the same global batch from the scenario's seed and keeps
its shard (ranks in rank order), so a single-process backend can rebuild
each group's concatenated batch from the files alone.
"""
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from .comm import group_of

FORMAT = "mpibn-golden"
FORMAT_VERSION = 1
STEPS = 2
INPUT_KEYS = ("x", "dy", "gamma", "beta", "moving_mean0", "moving_var0")
BFLOAT16_SCENARIOS = ("bfloat16", "bfloat16_params32")
OUTPUT_KEYS = ("y", "dx", "dgamma", "dbeta", "batch_mean", "batch_var", "moving_mean", "moving_var")

CONVENTIONS = {
    "layout": "x and dy are (steps, n_r, C) or (steps, n_r, C, H, W): step s of rank r; "
              "a group's batch for step s is the concatenation of its ranks' x[s] in rank order",
    "statistics": "per channel over the group's concatenated batch (axes N, H, W); batch_var is the "
                  "BIASED variance (divide by the count N), used for normalisation: "
                  "y = gamma * (x - mean) / sqrt(var + eps) + beta",
    "moving_statistics": "MindSpore convention: moving = momentum * moving + (1 - momentum) * batch_stat, "
                         "momentum is the weight of the OLD value; the moving variance takes the "
                         "UNBIASED variance N / (N - 1) * var with N the group's total count",
    "momentum_in_other_frameworks": {
        "mindspore": "momentum (same)", "pytorch": "1 - momentum (torch 0.1 == MindSpore 0.9)",
        "flax": "momentum (weight of old, same; flax's moving variance is biased)",
        "keras/tensorflow": "momentum (weight of old, same; keras' moving variance is biased)",
        "paddle": "momentum (weight of old, same)"},
    "gradients": "dy is the upstream gradient of the loss L = sum over ranks of sum(y_r * dy_r); dx is the "
                 "exact gradient of L (through the group statistics); dgamma and dbeta are each rank's "
                 "own share (sum over its samples of dy * xhat and dy): their sum over the group is the "
                 "gradient of the concatenated batch",
    "eval": "training=False with use_batch_statistics None (or False): the moving statistics normalise, "
            "nothing is updated, dx = gamma * dy / sqrt(moving_var + eps); use_batch_statistics=True "
            "uses and updates batch statistics even in eval mode",
    "dtypes": "y and dx have the input dtype; everything else is float64. gamma and beta are float64 "
              "holding values that float16 represents exactly, the initial moving statistics values "
              "that float32 represents exactly, so a float32 or float16 backend starts from the very "
              "same parameters. bfloat16 arrays (x, dy, y, dx of a 'bfloat16' scenario) are stored as "
              "float32, which represents them exactly (.npz files cannot name the ml_dtypes type); "
              "verify judges them at bfloat16's tolerance",
    "param_dtype": "the dtype mpibn held gamma, beta and the moving statistics in: 'float64', or "
                   "'float32' for the mixed-precision scenarios (its dgamma, dbeta and moving statistics "
                   "are then float32 values, stored as float64)",
    "rank_outside_groups": "a rank in no process group (or a group of one) normalises its own batch alone",
}


@dataclass
class Scenario:
    name: str
    description: str
    shards: list                     # samples per rank (len = number of ranks)
    tail: tuple = (3, 4, 4)          # (C,) for 2-D input, (C, H, W) for 4-D
    dtype: str = "float32"
    param_dtype: str = "float64"     # what the reference layer keeps parameters and moving statistics in
    process_groups: list = None
    offset: float = 3.0
    scale: float = 2.0
    eps: float = 1e-5
    momentum: float = 0.9
    training: bool = True
    use_batch_statistics: bool = None
    exact: bool = True
    seed: int = 0
    constant_channels: list = field(default_factory=list)   # channels whose x is the constant offset
    groups_of_rank: list = field(default_factory=list)

    def uses_batch_statistics(self):
        return self.training if self.use_batch_statistics is None else self.use_batch_statistics

    def outputs(self):
        keys = list(OUTPUT_KEYS)
        if not self.uses_batch_statistics():
            keys.remove("batch_mean")
            keys.remove("batch_var")
        return keys


def scenarios(size, dtype="float32", exact=True):
    """The standard scenarios for ``size`` ranks (dict name -> Scenario)."""
    even = [3] * size
    uneven = [1 + 2 * r for r in range(size)]
    empty = [0 if r == 1 else 3 for r in range(size)] if size > 1 else [3]
    outside = [list(range(size - 1))] if size > 2 else None
    # Groups of unequal sizes, the bigger one second (JAX's pmean divides by the first group's size).
    unequal = ([[0, 1], list(range(2, size))] if size >= 5 else
               [[0], list(range(1, size))] if size >= 3 else None)
    # Two equal groups of equal shards (K >= 4 even): where every JAX library can run groups.
    halves = [list(range(size // 2)), list(range(size // 2, size))] if size >= 4 and size % 2 == 0 else None
    pair = [1, 1] + [0] * (size - 2) if size > 1 else [2]
    ones = [1] * size if size > 1 else [2]
    listed = [
        Scenario("even", "every rank holds 3 samples of (3, 4, 4)", even),
        Scenario("uneven", "rank r holds 1 + 2r samples", uneven),
        Scenario("empty_rank", "rank 1 holds no sample at all", empty),
        Scenario("groups_rank_outside", "process_groups [[0 .. K-2]]: the last rank is in no group "
                 "and normalises alone", uneven, process_groups=outside),
        Scenario("two_d", "2-D input (N, C), uneven shards", [2 + r for r in range(size)], tail=(5,)),
        Scenario("float32_offset", "float32 data with |mean|/std = 1e5 (mean 1e5, std 1)", even,
                 dtype="float32", offset=1e5, scale=1.0),
        Scenario("float16", "float16 data, mean 8, std 2", uneven, dtype="float16", offset=8.0),
        Scenario("momentum", "momentum 0.7 (PyTorch 0.3) and eps 1e-3", uneven, momentum=0.7, eps=1e-3),
        Scenario("eval", "eval mode: moving statistics normalise, nothing is communicated or updated",
                 uneven, training=False),
        Scenario("eval_batch_statistics", "eval mode with use_batch_statistics=True: batch statistics "
                 "are used and the moving ones updated", uneven, training=False, use_batch_statistics=True),
        # Added in mpibn 0.1.0, still format version 1: shapes where peers break.
        Scenario("group_total_2", "2-D input: ranks 0 and 1 hold one sample each, the rest none: "
                 "2 values per channel in the group (the least training allows)", pair, tail=(4,)),
        Scenario("one_per_rank", "2-D input, one sample on every rank (two on a lone rank): "
                 "no rank has a variance of its own", ones, tail=(4,)),
        Scenario("wide_c2048", "2-D input (2, 2048) on every rank: C = 2048 channels, N = 2 samples",
                 [2] * size, tail=(2048,)),
        Scenario("constant_channel", "channel 1 holds the same value (the offset 3) everywhere: "
                 "variance 0, y = beta there", uneven, constant_channels=[1]),
        Scenario("float16_offset", "float16 data, mean 500, std 2 (|mean|/std = 250, sum of x^2 "
                 "over 65504 after 1 sample)", even, dtype="float16", offset=500.0),
        Scenario("groups_unequal", "process_groups of unequal sizes, the larger second "
                 "([[0], [1 .. K-1]]; [[0, 1], [2 .. K-1]] for K >= 5)", uneven, process_groups=unequal),
        Scenario("momentum_0", "momentum 0: the moving statistics become the last batch's", uneven,
                 momentum=0.0),
        Scenario("momentum_1", "momentum 1: the moving statistics never change", uneven, momentum=1.0),
        # Added with issue 23 (more peers, bfloat16), still format version 1: new names, one new field.
        Scenario("groups_even", "process_groups of equal sizes over equal shards ([[0 .. K/2-1], "
                 "[K/2 .. K-1]]): groups as every pmap library can express them", even, process_groups=halves),
        Scenario("float16_params32", "float16 data (mean 8, std 2) with float32 parameters and moving "
                 "statistics (Keras mixed_float16, Flax param_dtype=float32)", uneven, dtype="float16",
                 offset=8.0, param_dtype="float32"),
        Scenario("bfloat16", "bfloat16 data (ml_dtypes), mean 8, std 2", uneven, dtype="bfloat16", offset=8.0),
        Scenario("bfloat16_params32", "bfloat16 data with float32 parameters and moving statistics "
                 "(Keras mixed_bfloat16, Flax dtype=bfloat16, param_dtype=float32)", uneven,
                 dtype="bfloat16", offset=8.0, param_dtype="float32"),
    ]
    out = {}
    for i, s in enumerate(listed):
        if s.dtype == "bfloat16" and not have_bfloat16():
            continue                 # needs ml_dtypes; select() names it when asked for
        if s.dtype == "float32" and s.name != "float32_offset":
            s.dtype = dtype
        s.exact, s.seed = exact, 1000 + i
        members = [g for g in (s.process_groups or [list(range(size))])]
        s.groups_of_rank = [list(group_of(r, members)) for r in range(size)]
        out[s.name] = s
    return out


def have_bfloat16():
    """Whether ml_dtypes (bfloat16) can be imported; it is optional."""
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        return False
    return True


def array_dtype(name):
    """The NumPy dtype of a scenario's dtype name ('bfloat16' through ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def storable(a):
    """``a`` as it goes into a .npz file: bfloat16 as float32 (exact), the rest as is."""
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype.kind == "V" and a.dtype.name == "bfloat16" else a


def _exact_in(values, dtype):
    return np.asarray(values, dtype).astype(np.float64)


def inputs(s, rank):
    """The scenario's inputs for ``rank`` (the same global draw on every rank)."""
    rng = np.random.default_rng(s.seed)
    total = sum(s.shards)
    shape = (STEPS, total) + tuple(s.tail)
    dtype = array_dtype(s.dtype)
    x = (s.offset + s.scale * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    for c in s.constant_channels:
        x[:, :, c] = s.offset
    channels = s.tail[0]
    start = sum(s.shards[:rank])
    sl = slice(start, start + s.shards[rank])
    return {"x": x[:, sl], "dy": dy[:, sl],
            "gamma": _exact_in(rng.uniform(0.5, 1.5, channels), np.float16),
            "beta": _exact_in(rng.uniform(-0.5, 0.5, channels), np.float16),
            "moving_mean0": _exact_in(s.offset + rng.uniform(-1, 1, channels), np.float32),
            "moving_var0": _exact_in(rng.uniform(0.5, 2.0, channels) * s.scale ** 2, np.float32)}


def run_scenario(comm, s):
    """This rank's inputs and mpibn's outputs for scenario ``s`` (collective over comm)."""
    from .layer import SyncBatchNorm

    data = inputs(s, comm.Get_rank())
    channels = s.tail[0]
    bn = SyncBatchNorm(channels, eps=s.eps, momentum=s.momentum, gamma_init=data["gamma"],
                       beta_init=data["beta"], moving_mean_init=data["moving_mean0"],
                       moving_var_init=data["moving_var0"], use_batch_statistics=s.use_batch_statistics,
                       process_groups=s.process_groups, dtype=np.dtype(s.param_dtype), comm=comm,
                       exact=s.exact)
    bn.set_train(s.training)
    out = {k: [] for k in s.outputs()}
    try:
        for step in range(STEPS):
            out["y"].append(bn(data["x"][step]))
            out["dx"].append(bn.backward(data["dy"][step]))
            out["dgamma"].append(bn.gamma.grad.copy())
            out["dbeta"].append(bn.beta.grad.copy())
            if "batch_mean" in out:
                out["batch_mean"].append(bn.batch_mean.copy())
                out["batch_var"].append(bn.batch_var.copy())
            out["moving_mean"].append(bn.moving_mean.data.copy())
            out["moving_var"].append(bn.moving_variance.data.copy())
    finally:
        bn.close()
    data.update({k: np.stack(v) for k, v in out.items()})
    return data


def manifest(size, chosen, dtype, exact):
    from . import __version__
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "mpibn_version": __version__,
        "ranks": size, "steps": STEPS, "default_dtype": dtype,
        "statistics_mode": "exact (correctly rounded mean/var)" if exact else "default",
        "input_keys": list(INPUT_KEYS), "conventions": CONVENTIONS,
        "scenarios": {name: dict(asdict(s), tail=list(s.tail), outputs=s.outputs(),
                                 files=[f"{name}/rank{r}.npz" for r in range(size)])
                      for name, s in chosen.items()},
    }


def select(size, names=None, dtype="float32", exact=True):
    """The scenarios called ``names`` (all when None) for ``size`` ranks, in that order.

    ValueError naming the unknown ones (no MPI: the same answer on every rank).
    """
    table = scenarios(size, dtype, exact=exact)
    names = list(table) if names is None else list(names)
    if not have_bfloat16() and any(n in BFLOAT16_SCENARIOS for n in names):
        raise ValueError(f"scenario(s) {[n for n in names if n in BFLOAT16_SCENARIOS]} need bfloat16: "
                         f"pip install ml_dtypes")
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; known: {', '.join(table)}")
    return {n: table[n] for n in names}


def write(out, comm=None, names=None, dtype="float32", exact=True):
    """Write the golden directory ``out``: every rank its files, rank 0 the manifest.

    Collective over ``comm`` (default MPI.COMM_WORLD); ``names`` as in
    ``select`` (ValueError before any collective). Returns the scenarios written.
    """
    if comm is None:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    chosen = select(size, names, dtype, exact)
    for name, s in chosen.items():
        data = run_scenario(comm, s)
        os.makedirs(os.path.join(out, name), exist_ok=True)
        # The format: y, dx, x, dy in the scenario's dtype (bfloat16 as float32), the rest float64
        # (a float32 parameter dtype's values, exact in float64).
        np.savez(os.path.join(out, name, f"rank{rank}.npz"),
                 **{k: storable(v) if k in ("x", "dy", "y", "dx") else np.asarray(v, np.float64)
                    for k, v in data.items()})
    comm.Barrier()
    if rank == 0:
        with open(os.path.join(out, "manifest.json"), "w") as f:
            json.dump(manifest(size, chosen, dtype, exact), f, indent=2)
    return chosen
