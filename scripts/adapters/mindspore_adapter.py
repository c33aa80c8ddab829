#!/usr/bin/env python3
"""MindSpore (CPU) on an mpibn golden set: ``nn.BatchNorm1d/2d`` on each group's batch.

    python scripts/adapters/mindspore_adapter.py GOLDEN OUT [--json docs/conformance/mindspore-cpu.json]
    python -m mpibn verify GOLDEN OUT --skip-missing
    python scripts/adapters/mindspore_adapter.py --syncbn-probe [--json ...]   # what nn.SyncBatchNorm does on CPU

``nn.SyncBatchNorm`` has no CPU kernel (``--syncbn-probe`` records what it
does instead), so, as the PyTorch adapter does, we check MindSpore's own
numerics on what synchronised batch norm must equal: ``nn.BatchNorm2d``
(4-D) or ``nn.BatchNorm1d`` (2-D) on each group's concatenated batch, in
PyNative mode, with the scenario's momentum (MindSpore's own meaning, the
weight of the old value: no conversion), eps and ``use_batch_statistics``,
``set_train(training)``; float32 parameters (MindSpore's default ``dtype``;
its BatchNorm kernel takes float16 or float32 input only, so float64
scenarios are "unsupported"). Per rank: y and dx are the rank's rows (dx
from ``mindspore.grad`` of sum(y * dy)); dgamma/dbeta are the rank's share,
the gradient of sum(y * dy masked to the rank's rows). Every extra
gradient call runs the forward again, which updates the moving statistics
again: they are restored before each call and set to the first call's
update afterwards. batch_mean/batch_var are the primitive's saved
statistics (``reserve_space_1``/``reserve_space_2``): its documented
``batch_mean``/``batch_variance`` outputs come back as zeros on CPU (see
docs/conformance/mindspore-cpu.md).

Each scenario runs in its own process (``--timeout`` seconds), so a crash
costs one scenario; failures are recorded in ``OUT/status.json``.
``--json`` writes the conformance column; MindSpore's conventions are
mpibn's (momentum = weight of old, unbiased moving variance with the
batch's count), so the peer-convention reference only rounds statistics to
float32 (``peer_reference.py``).

Needs mindspore 2.x with numpy < 2 (commands in docs/conformance/mindspore-cpu.md).
"""
import argparse
import json
import os
import subprocess
import sys
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bounded import run_bounded  # noqa: E402
from common import concat, groups, load, uses_batch_statistics, write  # noqa: E402

CONVENTION = ("momentum = weight of the old value (as MindSpore's SyncBatchNorm and mpibn); moving variance "
              "unbiased with the batch's count; statistics and parameters float32; run as nn.BatchNorm1d/2d on "
              "each group's concatenated batch (nn.SyncBatchNorm has no CPU kernel), dgamma/dbeta each rank's "
              "share by masking dy")


def _set(ms, param, value):
    param.set_data(ms.Tensor(np.asarray(value, np.float32)))


def run_group(ms, nn, ranks, members, s):
    first = ranks[members[0]]
    channels = first["gamma"].shape[0]
    ndim = first["x"].ndim - 1
    cls = nn.BatchNorm2d if ndim == 4 else nn.BatchNorm1d
    f32 = lambda a: ms.Tensor(np.asarray(a, np.float32))     # noqa: E731
    bn = cls(channels, eps=s["eps"], momentum=s["momentum"], gamma_init=f32(first["gamma"]),
             beta_init=f32(first["beta"]), moving_mean_init=f32(first["moving_mean0"]),
             moving_var_init=f32(first["moving_var0"]), use_batch_statistics=s["use_batch_statistics"])
    bn.set_train(s["training"])
    weights = [bn.gamma, bn.beta]
    training = uses_batch_statistics(s)
    out = {r: {k: [] for k in s["outputs"]} for r in members}
    for step in range(2):
        x_np, slices = concat(ranks, members, "x", step)
        dy_np, _ = concat(ranks, members, "dy", step)
        x, dy = ms.Tensor(x_np), ms.Tensor(dy_np)
        before = bn.moving_mean.asnumpy().copy(), bn.moving_variance.asnumpy().copy()

        def restore():
            _set(ms, bn.moving_mean, before[0])
            _set(ms, bn.moving_variance, before[1])

        y = bn(x).asnumpy()
        after = bn.moving_mean.asnumpy().copy(), bn.moving_variance.asnumpy().copy()
        if training:
            restore()
            saved = bn.bn_train(x, bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance)
            mean, var = saved[3].asnumpy(), saved[4].asnumpy()
        restore()
        dx, _ = ms.grad(lambda t, d=dy: (bn(t) * d).sum(), grad_position=0, weights=weights)(x)
        dx = dx.asnumpy()
        shares = {}
        for r in members:
            restore()
            mask = np.zeros_like(dy_np)
            mask[slices[r]] = dy_np[slices[r]]
            _, (dg, db) = ms.grad(lambda t, d=ms.Tensor(mask): (bn(t) * d).sum(), grad_position=0,
                                  weights=weights)(x)
            shares[r] = dg.asnumpy(), db.asnumpy()
        _set(ms, bn.moving_mean, after[0])
        _set(ms, bn.moving_variance, after[1])
        for r in members:
            o = out[r]
            o["y"].append(y[slices[r]])
            o["dx"].append(dx[slices[r]])
            o["dgamma"].append(shares[r][0])
            o["dbeta"].append(shares[r][1])
            if "batch_mean" in o:
                o["batch_mean"].append(mean)
                o["batch_var"].append(var)
            o["moving_mean"].append(after[0])
            o["moving_var"].append(after[1])
    return {r: {k: np.stack(v) for k, v in o.items()} for r, o in out.items()}


def worker(golden, out, name):
    """One scenario, in its own process."""
    import mindspore as ms
    from mindspore import nn
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    manifest, data = load(golden)
    s = manifest["scenarios"][name]
    if s["dtype"] not in ("float16", "float32"):
        os.makedirs(os.path.join(out, name), exist_ok=True)
        with open(os.path.join(out, name, "unsupported.txt"), "w") as f:
            f.write(f"MindSpore's BatchNorm kernel takes float16 or float32 input, not {s['dtype']}\n")
        return 3
    try:
        for members in groups(s):
            for r, arrays in run_group(ms, nn, data[name], members, s).items():
                write(out, name, r, arrays)
    except BaseException:
        os.makedirs(os.path.join(out, name), exist_ok=True)
        with open(os.path.join(out, name, "error.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    return 0


def run_scenarios(golden, out, names, ranks, timeout):
    status = {}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MPI_", "HYDRA_"))}
    env.setdefault("GLOG_v", "3")             # MindSpore's INFO/WARNING lines would bury the errors
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, golden, out]
        try:
            run = run_bounded(cmd, timeout, env)
            d = os.path.join(out, name)
            if run.returncode == 0 and all(os.path.exists(os.path.join(d, f"rank{r}.npz")) for r in range(ranks)):
                status[name] = {"status": "ok"}
            elif run.returncode == 3:
                with open(os.path.join(d, "unsupported.txt")) as f:
                    status[name] = {"status": "unsupported", "message": f.read().strip()}
            else:
                path = os.path.join(d, "error.txt")
                text = open(path).read() if os.path.exists(path) else run.stderr
                last = (text.strip().splitlines() or ["(no output)"])[-1]
                status[name] = {"status": "error", "message": f"exit {run.returncode}; {last}"}
        except subprocess.TimeoutExpired:
            status[name] = {"status": "timeout", "message": f"no result after {timeout} s (killed)"}
        print(f"{name}: {status[name]['status']} {status[name].get('message', '')}", flush=True)
    with open(os.path.join(out, "status.json"), "w") as f:
        json.dump(status, f, indent=2)
    return status


LADDER_TEXT = {"float32_stats": "match once the statistics are rounded to float32, the dtype of MindSpore's "
                                "parameters (a limit of the format; convention)",
               "float32_arithmetic": "within 32 float32 ulps of the conditioning of the formula (no float32 "
                                     "evaluation does better; accuracy)"}


NUMERICAL = ("off under every convention tried: the batch statistics are not the correctly rounded float32 "
             "values (defect M1 in docs/conformance/mindspore-cpu.md)")


def conformance(golden, out, status, versions, command, syncbn):
    from peer_reference import column_cell, describe, judge

    from mpibn.verify import VERDICT_RULE
    manifest, data = load(golden)
    doc = {"column": "mindspore-cpu",
           "framework": "MindSpore nn.BatchNorm1d/2d (CPU, PyNative) on each group's concatenated batch; "
                        "nn.SyncBatchNorm has no CPU kernel",
           "runnable": True, "versions": versions, "command": command,
           "golden": f"{manifest['format']} version {manifest['format_version']}, mpibn "
                     f"{manifest['mpibn_version']}, statistics {manifest['statistics_mode']}",
           "convention": CONVENTION, "verdict_rule": VERDICT_RULE, "scenarios": {}}
    if syncbn:
        doc["syncbatchnorm_on_cpu"] = syncbn
    for name, s in manifest["scenarios"].items():
        if name not in status:              # not asked for (--scenarios)
            continue
        st = status[name]
        if st["status"] != "ok":
            doc["scenarios"][name] = {"verdict": "unsupported" if st["status"] == "unsupported" else "error",
                                      "errors": None, "errors_peer_convention": None, "note": st["message"]}
            continue
        results = []
        for r in range(manifest["ranks"]):
            with np.load(os.path.join(out, name, f"rank{r}.npz")) as npz:
                results.append({k: npz[k] for k in npz.files})
        j = judge(s, data[name], results, [("float32_stats", "convention", {"stats_dtype": "float32"}),
                                           ("float32_arithmetic", "accuracy", {"float32_arithmetic": True})])
        doc["scenarios"][name] = column_cell(j, describe(j["explained"], LADDER_TEXT, NUMERICAL))
    return doc


PROBE = r'''
import json, os, sys
import numpy as np
import mindspore as ms
from mindspore import mint, nn
from mindspore.communication import init, get_rank, get_group_size
ms.set_context(mode=ms.PYNATIVE_MODE)
ms.set_device("CPU")
results = {}
if os.environ.get("MPIBN_PROBE_INIT") == "1":
    init()
rank, size = get_rank(), get_group_size()
x = ms.Tensor(np.random.default_rng(rank).standard_normal((4, 3, 2, 2)).astype(np.float32))
layers = (("nn.SyncBatchNorm(3)", lambda: nn.SyncBatchNorm(3)),
          ("nn.SyncBatchNorm(3, process_groups=[[0, 1]])", lambda: nn.SyncBatchNorm(3, process_groups=[[0, 1]])),
          ("mint.nn.SyncBatchNorm(3)", lambda: mint.nn.SyncBatchNorm(3)))
for label, make in layers:
    try:
        bn = make()
        bn.set_train(True)
        y = bn(x).asnumpy()
        local = nn.BatchNorm2d(3)
        local.set_train(True)
        same = bool(np.array_equal(y, local(x).asnumpy()))
        results[label] = f"runs; output {'equals' if same else 'differs from'} a local nn.BatchNorm2d"
    except Exception as exc:
        lines = [l for l in str(exc).splitlines() if l.strip() and not l.startswith("-")]
        results[label] = f"{type(exc).__name__}: {lines[0] if lines else ''}"
with open(os.path.join(sys.argv[1], f"probe_rank{rank}_of{size}.json"), "w") as f:
    json.dump(results, f)
'''


def syncbn_probe(timeout):
    """What nn.SyncBatchNorm does on CPU: one process without init(), and 2 workers under msrun."""
    import tempfile
    found = {}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MPI_", "HYDRA_"))}
    env["GLOG_v"] = "3"
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")   # msrun starts "python"
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "probe.py")
        with open(script, "w") as f:
            f.write(PROBE)
        runs = {"single process, no communication init()": ([sys.executable, script, tmp], {}),
                "msrun --worker_num=2 (CPU collectives), init()": (
                    [os.path.join(os.path.dirname(sys.executable), "msrun"), "--worker_num=2",
                     "--local_worker_num=2", "--master_port=" + str(8200 + os.getpid() % 500),
                     "--log_dir=" + os.path.join(tmp, "logs"), "--join=True", script, tmp],
                    {"MPIBN_PROBE_INIT": "1"})}
        for label, (cmd, extra) in runs.items():
            for old in [p for p in os.listdir(tmp) if p.startswith("probe_rank")]:
                os.remove(os.path.join(tmp, old))
            try:
                run_bounded(cmd, timeout, dict(env, **extra))
            except subprocess.TimeoutExpired:
                found[label] = f"no result after {timeout} s"
                continue
            per_rank = {}
            for p in sorted(os.listdir(tmp)):
                if p.startswith("probe_rank"):
                    with open(os.path.join(tmp, p)) as f:
                        per_rank[p[len("probe_"):-5]] = json.load(f)
            found[label] = per_rank or "no rank wrote a result"
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("golden", nargs="?")
    parser.add_argument("out", nargs="?")
    parser.add_argument("--scenarios", help="comma-separated (default: all of the golden set)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per scenario process (default 300)")
    parser.add_argument("--json", help="also write the conformance column here (docs/conformance/mindspore-cpu.json)")
    parser.add_argument("--syncbn-probe", action="store_true",
                        help="also record what nn.SyncBatchNorm does on CPU (alone: print it)")
    parser.add_argument("--json-only", action="store_true",
                        help="do not run the framework: judge the results already in OUT (OUT/status.json)")
    parser.add_argument("--worker", metavar="SCENARIO", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.golden, args.out, args.worker)
    try:
        import mindspore as ms
    except ImportError as exc:
        sys.exit(f"mindspore_adapter: {exc}; install mindspore 2.x with numpy<2 "
                 f"(commands in docs/conformance/mindspore-cpu.md)")
    if not args.golden:
        if not args.syncbn_probe:
            parser.error("GOLDEN and OUT are needed unless --syncbn-probe is given")
        print(json.dumps(syncbn_probe(args.timeout), indent=2))
        return 0
    from peer_reference import recorded_run, scenarios_to_run
    manifest, names = scenarios_to_run(args.golden, args.scenarios)

    def make():
        syncbn = syncbn_probe(args.timeout) if args.syncbn_probe else None
        if syncbn:
            print(json.dumps(syncbn, indent=2))
        return {"syncbn": syncbn,
                "status": run_scenarios(args.golden, args.out, names, manifest["ranks"], args.timeout)}
    run = recorded_run(args.golden, args.out, args.json_only, __file__, argv, make)
    status = run["status"]
    ok = sum(v["status"] == "ok" for v in status.values())
    print(f"mindspore {ms.__version__} (CPU, nn.BatchNorm1d/2d on each group's batch): {ok} of {len(names)} "
          f"scenarios written to {args.out}")
    if args.json:
        versions = {"mindspore": ms.__version__, "numpy": np.__version__, "python": sys.version.split()[0]}
        from peer_reference import write_json
        write_json(args.json, conformance(args.golden, args.out, status, versions, run["command"], run["syncbn"]))
        print(f"conformance column written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
