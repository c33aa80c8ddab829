#!/usr/bin/env python3
"""ChainerMN on an mpibn golden set: ``chainermn.links.MultiNodeBatchNormalization`` under mpiexec.

    python scripts/adapters/chainermn_adapter.py GOLDEN OUT [--json docs/conformance/chainermn.json]
    python -m mpibn verify GOLDEN OUT --skip-missing

The closest peer to mpibn: NumPy arrays, statistics exchanged with mpi4py.
The script launches one ``mpiexec -n K python -m mpi4py`` job per scenario
(K = the golden set's ranks; ``--timeout`` seconds each, so a crash or a
hang in one scenario costs that scenario only) and each rank r runs the
link on its own shard, as a ChainerMN user would: the ``naive`` (CPU)
communicator over ``MPI.COMM_WORLD.Split`` by process group (a rank in no
group gets a communicator of its own), ``decay`` = MindSpore's momentum
(both are the weight of the old value), the scenario's eps, gamma/beta as
``initial_gamma``/``initial_beta``, the moving statistics written into
``avg_mean``/``avg_var``. Training vs eval is ``chainer.config.train``, set
to whether the scenario uses batch statistics (ChainerMN has no separate
``use_batch_statistics``). Parameters are float32, as ``dtype=None`` gives,
float64 for float64 scenarios (``--param-dtype float64`` forces float64:
then the statistics are computed in float64 too). Gradients: ``y.grad = dy``
and ``y.backward()``; batch_mean/batch_var are the function node's
``mean``/``var``. A scenario whose job fails is recorded in
``OUT/status.json`` with the failing rank's message.

ChainerMN as it is (chainermn/functions/batch_normalization.py, chainer
7.8.1): every rank's mean and mean of squares weigh the same (one
``Allreduce`` then ``* 1 / size``), the variance is E[x^2] - E[x]^2 in the
parameters' dtype, the moving variance is unbiased with the rank's *own*
count, and dgamma/dbeta are the group's sums divided by the number of
ranks. ``--json`` writes the conformance column (``peer_reference.py``
recomputes each scenario under these conventions to tell conventions from
defects; see docs/conformance/chainermn.md).

Needs chainer 7.8.1 with mpi4py and numpy < 1.24 in the same environment
(install commands in docs/conformance/chainermn.md); mpibn itself only for
``--json``.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bounded import run_bounded  # noqa: E402
from common import groups, load, uses_batch_statistics, write  # noqa: E402

CONVENTION = ("momentum (decay) = weight of the old value, as MindSpore; statistics = equal-weight mean over "
              "the group's ranks of each rank's mean and mean of squares (var = E[x^2] - E[x]^2 in the "
              "parameters' dtype); moving variance unbiased with the rank's own count m/(m-1) "
              "(max(m-1, 1)); dgamma/dbeta = the group's sum / number of ranks on every rank; dx = gradient "
              "of the sum of the ranks' losses")


def worker(golden, out, name, param_dtype):
    """One rank of one scenario (run under mpiexec -m mpi4py)."""
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    with open(os.path.join(golden, "manifest.json")) as f:
        s = json.load(f)["scenarios"][name]
    try:
        import chainer
        import chainermn
        from chainermn.links import MultiNodeBatchNormalization
    except ImportError as exc:
        sys.exit(f"chainermn_adapter: {exc} (see docs/conformance/chainermn.md for the install commands)")
    with np.load(os.path.join(golden, name, f"rank{rank}.npz")) as npz:
        d = {k: npz[k] for k in npz.files}
    color = groups(s).index(tuple(s["groups_of_rank"][rank]))
    mpi_comm = world.Split(color, rank)
    comm = chainermn.create_communicator("naive", mpi_comm)
    if param_dtype is None:
        param_dtype = np.float64 if s["dtype"] == "float64" else np.float32
    channels = d["gamma"].shape[0]
    link = MultiNodeBatchNormalization(channels, comm, decay=s["momentum"], eps=s["eps"], dtype=param_dtype,
                                       initial_gamma=d["gamma"].astype(param_dtype),
                                       initial_beta=d["beta"].astype(param_dtype))
    link.avg_mean[...] = d["moving_mean0"]
    link.avg_var[...] = d["moving_var0"]
    training = uses_batch_statistics(s)
    res = {k: [] for k in s["outputs"]}
    try:
        for step in range(2):
            link.cleargrads()
            with chainer.using_config("train", training):
                x = chainer.Variable(d["x"][step].copy())
                y = link(x)
                y.grad = d["dy"][step].copy()
                y.backward()
            res["y"].append(y.array)
            res["dx"].append(x.grad)
            res["dgamma"].append(link.gamma.grad.copy())
            res["dbeta"].append(link.beta.grad.copy())
            if "batch_mean" in res:
                res["batch_mean"].append(np.asarray(y.creator.mean).copy())
                res["batch_var"].append(np.asarray(y.creator.var).copy())
            res["moving_mean"].append(link.avg_mean.copy())
            res["moving_var"].append(link.avg_var.copy())
    except BaseException:
        # The job ends here (mpi4py -m aborts it); leave the reason where the driver finds it.
        os.makedirs(os.path.join(out, name), exist_ok=True)
        with open(os.path.join(out, name, f"error_rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    write(out, name, rank, {k: np.stack(v) for k, v in res.items()})
    return 0


def find_mpiexec(given):
    if given:
        return given
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else shutil.which("mpiexec")


def run_scenarios(golden, out, names, ranks, mpiexec, timeout, param_dtype):
    """{scenario: {"status": "ok" | "error" | "timeout", "message": ...}}, one mpiexec job each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MPI_", "HYDRA_"))}
    env.setdefault("OMP_NUM_THREADS", "1")
    status = {}
    for name in names:
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "mpi4py", os.path.abspath(__file__),
               "--worker", name, golden, out] + (["--param-dtype", param_dtype] if param_dtype else [])
        try:
            run = run_bounded(cmd, timeout, env)
            ok = run.returncode == 0 and all(
                os.path.exists(os.path.join(out, name, f"rank{r}.npz")) for r in range(ranks))
            if ok:
                status[name] = {"status": "ok"}
            else:
                errs = sorted(f for f in os.listdir(os.path.join(out, name)) if f.startswith("error_rank")) \
                    if os.path.isdir(os.path.join(out, name)) else []
                if errs:
                    with open(os.path.join(out, name, errs[0])) as f:
                        last = f.read().strip().splitlines()[-1]
                    msg = f"{errs[0][6:-4]}: {last}"
                else:
                    msg = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
                status[name] = {"status": "error", "message": f"exit {run.returncode}; {msg}"}
        except subprocess.TimeoutExpired:
            status[name] = {"status": "timeout", "message": f"no result after {timeout} s (killed)"}
        print(f"{name}: {status[name]['status']} {status[name].get('message', '')}", flush=True)
    with open(os.path.join(out, "status.json"), "w") as f:
        json.dump(status, f, indent=2)
    return status


LADDER_TEXT = {
    "share": "the group's sum divided by its number of ranks on every rank (ChainerMN's gradient share: "
             "after its optimizer averages gradients over ranks the update is the same; convention)",
    "rank_weights": "every rank's mean and mean of squares weigh the same whatever its batch size "
                    "(ChainerMN's design; equals the concatenated batch only for equal shards; convention)",
    "float32_stats": "statistics held in float32, the parameters' dtype (a limit of the format; convention)",
    "float32_arithmetic": "within 32 float32 ulps of the conditioning of the formula (no float32 evaluation does "
                          "better; accuracy)",
    "local_count": "moving variance unbiased with the rank's own count m/(m-1), not the group's "
                   "(defect D1 in docs/conformance/chainermn.md)",
}


NUMERICAL = ("off under every convention tried: the variance is E[x^2] - E[x]^2 in the parameters' dtype, "
             "with x^2 rounded to the input's dtype first (defects D2, D3 in docs/conformance/chainermn.md)")


def conformance(golden, out, status, versions, command, param_dtype):
    """The docs/conformance/chainermn.json document (needs mpibn for the verdict tolerance)."""
    from peer_reference import column_cell, describe, judge

    from mpibn.verify import VERDICT_RULE
    manifest, data = load(golden)
    doc = {"column": "chainermn" if not param_dtype else f"chainermn-{param_dtype}-parameters",
           "framework": "chainermn.links.MultiNodeBatchNormalization (naive communicator) under mpiexec",
           "runnable": True, "versions": versions, "command": command,
           "golden": f"{manifest['format']} version {manifest['format_version']}, mpibn "
                     f"{manifest['mpibn_version']}, statistics {manifest['statistics_mode']}",
           "convention": CONVENTION, "verdict_rule": VERDICT_RULE, "scenarios": {}}
    for name, s in manifest["scenarios"].items():
        if name not in status:              # not asked for (--scenarios)
            continue
        st = status[name]
        if st["status"] != "ok":
            note = st["message"]
            if "ZeroDivisionError" in note:
                note += " (a rank with no sample: defect D4 in docs/conformance/chainermn.md)"
            doc["scenarios"][name] = {"verdict": "error", "errors": None, "errors_peer_convention": None,
                                      "note": note}
            continue
        results = []
        for r in range(manifest["ranks"]):
            with np.load(os.path.join(out, name, f"rank{r}.npz")) as npz:
                results.append({k: npz[k] for k in npz.files})
        f32 = (param_dtype or ("float64" if s["dtype"] == "float64" else "float32")) == "float32"
        ladder = [("share", "convention", {"grad_share": "group_mean"}),
                  ("rank_weights", "convention", {"weights": "rank"})]
        if f32:
            ladder += [("float32_stats", "convention", {"stats_dtype": "float32"}),
                       ("float32_arithmetic", "accuracy", {"float32_arithmetic": True})]
        ladder.append(("local_count", "defect", {"moving_var_count": "local"}))
        j = judge(s, data[name], results, ladder)
        doc["scenarios"][name] = column_cell(j, describe(j["explained"], LADDER_TEXT, NUMERICAL))
    return doc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("golden")
    parser.add_argument("out")
    parser.add_argument("--scenarios", help="comma-separated (default: all of the golden set)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds per scenario job (default 180)")
    parser.add_argument("--mpiexec", help="default: the one next to this Python, else on PATH")
    parser.add_argument("--param-dtype", choices=["float32", "float64"],
                        help="dtype of the link's parameters and statistics (default: float32, float64 for "
                             "float64 scenarios)")
    parser.add_argument("--json", help="also write the conformance column here (docs/conformance/chainermn.json)")
    parser.add_argument("--json-only", action="store_true",
                        help="do not run the framework: judge the results already in OUT (OUT/status.json)")
    parser.add_argument("--worker", metavar="SCENARIO", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.golden, args.out, args.worker,
                      np.dtype(args.param_dtype) if args.param_dtype else None)
    try:
        import chainer
        import mpi4py
    except ImportError as exc:
        sys.exit(f"chainermn_adapter: {exc}; install chainer==7.8.1 with mpi4py "
                 f"(commands in docs/conformance/chainermn.md)")
    from peer_reference import recorded_run, scenarios_to_run
    manifest, names = scenarios_to_run(args.golden, args.scenarios)
    mpiexec = find_mpiexec(args.mpiexec)
    if not mpiexec:
        sys.exit("chainermn_adapter: no mpiexec found (pip install mpich, or pass --mpiexec)")
    run = recorded_run(args.golden, args.out, args.json_only, __file__, argv, lambda: {
        "status": run_scenarios(args.golden, args.out, names, manifest["ranks"], mpiexec, args.timeout,
                                args.param_dtype)})
    status = run["status"]
    versions = {"chainer": chainer.__version__, "mpi4py": mpi4py.__version__, "numpy": np.__version__,
                "python": sys.version.split()[0]}
    try:
        from mpi4py import MPI
        versions["mpi"] = MPI.Get_library_version().splitlines()[0].strip()
    except Exception:            # the version string is informative only
        pass
    ok = sum(v["status"] == "ok" for v in status.values())
    print(f"chainer {chainer.__version__} (ChainerMN MultiNodeBatchNormalization, mpiexec -n "
          f"{manifest['ranks']}): {ok} of {len(names)} scenarios written to {args.out}")
    if args.json:
        from peer_reference import write_json
        write_json(args.json, conformance(args.golden, args.out, status, versions, run["command"],
                                          args.param_dtype))
        print(f"conformance column written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
