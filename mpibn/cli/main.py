"""Command line: ``mpibn COMMAND --help`` (or ``python -m mpibn COMMAND --help``).

Parses, refuses what can be refused before MPI starts, relaunches the
command under mpiexec when it needs ranks and was started by hand, and hands
it over: ``demo`` and ``explain`` to their modules here, ``golden`` and
``verify`` to the adapters below (over ``mpibn.golden.write`` and
``mpibn.verify.verify``, which know nothing of argparse), and ``bench``,
with every later argument, to ``mpibn.cli.bench``.
"""
import argparse
import json
import os
import sys

from .launch import run_under_mpiexec, under_mpiexec

# Seconds a relaunched command may run under mpiexec.
TIMEOUTS = {"demo": 120, "explain": 120, "golden": 600}


def prog():
    """How the user started us: the ``mpibn`` console script, or ``python -m mpibn``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "mpibn" if name.split(".")[0] == "mpibn" else "python -m mpibn"


NP_HELP = "ranks to launch (default 4; under mpiexec: the ranks it started, and must equal them)"


def _parser():
    parser = argparse.ArgumentParser(
        prog=prog(),
        description="mpibn: reference SyncBatchNorm (MindSpore semantics) in NumPy over MPI.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_demo(sub)
    _add_explain(sub)
    _add_golden(sub)
    _add_verify(sub)
    bench = sub.add_parser(
        "bench", help="time mpibn next to torch CPU, naive NumPy and a memory copy",
        description="Runs mpibn.cli.bench with the arguments that follow; see docs/performance.md. "
                    "Everything after 'bench' goes to it: mpibn bench --help shows its options.",
        add_help=False)
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _add_demo(sub):
    demo = sub.add_parser(
        "demo", help="synced statistics over N ranks equal those of the concatenated batch",
        description="Run one training step of SyncBatchNorm over N ranks with uneven shards "
                    "(one may be empty) and compare y, dx and the statistics with a plain "
                    "float64 batch norm of the concatenated batch. Relaunches itself under "
                    "mpiexec when not started by one.")
    demo.add_argument("-n", "--np", type=int, default=None, help=NP_HELP)
    demo.add_argument("--batch", type=int, default=10, help="global batch size (default 10)")
    demo.add_argument("--channels", type=int, default=3, help="channels (default 3)")
    demo.add_argument("--offset", type=float, default=5.0, help="mean of the data (default 5)")
    demo.add_argument("--seed", type=int, default=0)


def _add_golden(sub):
    golden = sub.add_parser(
        "golden", help="write reference inputs and outputs for other backends to match",
        description="Run every scenario (even/uneven/empty shards, groups, 2-D, float32 with "
                    "|mean|/std=1e5, float16, momentum, eval, ...) for two training steps over N "
                    "ranks and write DIR/manifest.json and DIR/<scenario>/rank<r>.npz (inputs and "
                    "mpibn's outputs). Relaunches itself under mpiexec when not started by one.")
    golden.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    golden.add_argument("-n", "--np", type=int, default=None, help=NP_HELP)
    golden.add_argument("--scenarios", metavar="NAMES", help="comma-separated subset (default: all)")
    golden.add_argument("--dtype", default="float32", choices=["float16", "float32", "float64"],
                        help="input dtype of the scenarios that do not fix one (default float32)")
    golden.add_argument("--no-exact", action="store_true",
                        help="use the default statistics instead of exact=True")


def _add_verify(sub):
    verify = sub.add_parser(
        "verify", help="compare another backend's results with a golden directory",
        description="Compare RESULTS/<scenario>/rank<r>.npz (the golden layout, output keys) with "
                    "GOLDEN and print max abs / max rel (normwise) / max ulps per scenario and "
                    "quantity, at the tolerance of the scenario's dtype (never the dtype a result is "
                    "stored in). Exit 0 when all pass, 1 on a failure, a missing quantity or when "
                    "nothing was compared, 2 on a missing or malformed file, field or key or an "
                    "unknown scenario or quantity (one line naming it). Rules: docs/ground-truth.md.")
    verify.add_argument("golden", metavar="GOLDEN")
    verify.add_argument("results", metavar="RESULTS")
    verify.add_argument("--rtol", type=float, default=None,
                        help="pass when max abs <= atol + rtol * max|expected| "
                             "(default 32 eps of the scenario's dtype)")
    verify.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0)")
    verify.add_argument("--max-ulps", type=int, default=None, help="also require max ulps <= this")
    verify.add_argument("--scenarios", metavar="NAMES", help="comma-separated subset")
    verify.add_argument("--quantities", metavar="NAMES", help="comma-separated subset (y,dx,...)")
    verify.add_argument("--skip-missing", action="store_true",
                        help="report the files or keys the results lack as 'missing: rank r' instead of "
                             "stopping with exit 2 (a missing quantity still fails: exit 1; leave "
                             "quantities out with --quantities or --scenarios)")
    verify.add_argument("--markdown", action="store_true", help="print a Markdown table")


def _groups(text):
    try:
        groups = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a JSON list of lists: {text!r}") from None
    if groups is not None and not (isinstance(groups, list)
                                   and all(isinstance(g, list) for g in groups)):
        raise argparse.ArgumentTypeError(f"expected a list of lists of rank ids, e.g. "
                                         f"'[[0,1],[2,3]]', or 'null'; got {text!r}")
    return groups


def _shards(text):
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sample counts, "
                                         f"e.g. 3,1,2,0; got {text!r}") from None
    if any(s < 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"sample counts must be >= 0, got {text!r}")
    return sizes


def _add_explain(sub):
    explain = sub.add_parser(
        "explain", help="print one tiny synced step rank by rank: moments, buffers, statistics, sums",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one training forward and backward of SyncBatchNorm on a tiny batch\n"
                    "(2 channels, uneven shards 3,1,2,0 samples, groups [[0,1],[2,3]], rank 3 empty)\n"
                    "and print, step by step:\n"
                    "  1. each rank's shard and local moments n_r, mean_r, m2_r  (batch_norm_stats)\n"
                    "  2. the forward Allreduce: the table of rows that came back, bit for bit\n"
                    "  3. the group's N, mean, var, s and moving statistics (merge_stats), next\n"
                    "     to the mean of the ranks' means, which is wrong\n"
                    "  4. one element of y worked out by hand      (batch_norm_elemt)\n"
                    "  5. the backward sums sum(dy), sum(dy*xhat) each rank sent, and the group's\n"
                    "  6. one element of dx worked out by hand     (batch_norm_backward_elemt)\n"
                    "  7. a check against textbook batch norm of each group's concatenated batch\n"
                    "Every number about the exchange is read from the real buffer. Default: channel\n"
                    "0, each group's table once; --full: everything. Relaunches itself under mpiexec\n"
                    "when not started by one. The math is derived in docs/derivation.md.",
        epilog="examples:\n"
               "  python -m mpibn explain\n"
               "  python -m mpibn explain --full                      # every channel and row\n"
               "  python -m mpibn explain --groups '[[0,1,3]]'        # rank 2 in no group\n"
               "  python -m mpibn explain --shards 4,0,1,3 --digits 17  # every bit of the buffer")
    explain.add_argument("-n", "--np", type=int, default=None, help=NP_HELP)
    explain.add_argument("--groups", type=_groups, default=None, metavar="JSON",
                         help="process_groups as JSON (default [[0,1],[2,3]] on 4 ranks, "
                              "else null: all ranks)")
    explain.add_argument("--shards", type=_shards, default=None, metavar="N0,N1,...",
                         help="samples per rank (default 3,1,2,0)")
    explain.add_argument("--channels", type=int, default=2, help="channels (default 2)")
    explain.add_argument("--digits", type=int, default=6,
                         help="significant digits printed (default 6; 17 shows every bit)")
    explain.add_argument("--seed", type=int, default=0)
    explain.add_argument("--full", action="store_true",
                         help="print every channel and every rank's copy of every buffer")


def main(argv=None):
    from ..comm import MPIUnavailable
    try:
        return _main(argv)
    except MPIUnavailable as exc:            # one clear line, not libmpi's search list
        print(f"{prog()}: {exc}", file=sys.stderr)
        return 1


def _main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:               # every later argument belongs to mpibn.cli.bench
        from .bench.run import main as bench_main
        return bench_main(argv[1:], prog=f"{prog()} bench")
    args = _parser().parse_args(argv)
    if args.command == "verify":            # no MPI, no ranks
        return verify_command(args)
    _resolve_np(args)
    _check(args)
    if not under_mpiexec() and args.np > 1:
        return run_under_mpiexec(args.np, "mpibn", argv, timeout=TIMEOUTS[args.command])
    if args.command == "demo":
        from .demo import run
    elif args.command == "explain":
        from .explain import run
    else:
        run = golden_command
    return run(args)


def _check(args):
    """Refuse impossible demo, explain and golden settings before any mpiexec starts."""
    if args.command == "demo" and (args.batch < 2 or args.channels < 1):
        _parser().error("--batch must be at least 2 and --channels at least 1")
    if args.command == "golden":
        _check_out_dir(args.out)
    if args.command != "explain":
        return
    if not 1 <= args.channels <= 8 or not 1 <= args.digits <= 17:
        _parser().error("--channels must be in 1..8 and --digits in 1..17")
    if not under_mpiexec():                 # under mpiexec every rank checks (explain.run)
        from . import explain
        groups = args.groups if args.groups is not None else explain.default_groups(args.np)
        problem = explain.check_setup(groups, explain.shard_sizes(args.np, args.shards), args.np)
        if problem:
            _parser().error(problem)


def _check_out_dir(out):
    """``golden --out``: a directory, or a path where one can be made (not under a file)."""
    path = os.path.abspath(out)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if os.path.isdir(path):
        return
    problem = (f"--out {out}: {'is' if path == os.path.abspath(out) else f'{path} is'} a file, "
               f"not a directory")
    if not under_mpiexec():
        _parser().error(problem)
    from mpi4py import MPI
    if MPI.COMM_WORLD.Get_rank() == 0:       # one message, not one per rank
        _parser().error(problem)
    sys.exit(2)


def _resolve_np(args):
    """--np: how many ranks to launch; under mpiexec, a check of the ranks it started."""
    if args.np is not None and args.np < 1:
        _parser().error(f"--np must be at least 1, got {args.np}")
    if not under_mpiexec():
        args.np = 4 if args.np is None else args.np
        return
    from mpi4py import MPI
    size = MPI.COMM_WORLD.Get_size()
    if args.np is not None and args.np != size:
        # Running on fewer or more ranks than asked would answer another question.
        if MPI.COMM_WORLD.Get_rank() == 0:
            _parser().error(f"--np {args.np} but mpiexec started {size} rank(s); "
                            f"drop --np under mpiexec, or make the two agree")
        sys.exit(2)
    args.np = size



def golden_command(args, comm=None):
    """``mpibn golden`` on every rank: ``mpibn.golden.write``; rank 0 says what happened.

    ``comm`` defaults to MPI.COMM_WORLD. Exit status 2 for unknown scenario names.
    """
    from .. import golden
    if comm is None:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    names = args.scenarios.split(",") if args.scenarios else None
    try:
        golden.select(comm.Get_size(), names, args.dtype, exact=not args.no_exact)
    except ValueError as exc:               # every rank refuses, before any collective
        if comm.Get_rank() == 0:           # flushed: a rank exiting 2 makes mpi4py abort the job
            print(f"mpibn golden: {exc}", flush=True)
        return 2
    chosen = golden.write(args.out, comm, names, args.dtype, exact=not args.no_exact)
    if comm.Get_rank() == 0:
        print(f"mpibn golden: {len(chosen)} scenarios x {comm.Get_size()} ranks written to {args.out}")
    return 0


def verify_command(args):
    """``mpibn verify`` (no MPI needed): print the table, return the exit status (0 pass, 1 fail, 2 unusable)."""
    from ..verify import VerifyError, format_table, summary, verify
    try:
        rows, ok = verify(args.golden, args.results,
                          scenarios=args.scenarios.split(",") if args.scenarios is not None else None,
                          quantities=_quantities(args.golden, args.quantities),
                          rtol=args.rtol, atol=args.atol, max_ulps=args.max_ulps,
                          skip_missing=args.skip_missing)
    except VerifyError as exc:
        print(f"mpibn verify: {exc}")
        return 2
    print(format_table(rows, markdown=args.markdown))
    text, status = summary(rows, ok)
    print("\n" + text)
    return status


def _quantities(golden, text):
    """--quantities as a list (None: all); VerifyError naming the ones no scenario has."""
    from ..verify import VerifyError, load_manifest
    if text is None:
        return None
    names = text.split(",")
    manifest = load_manifest(golden)
    known = sorted({q for entry in manifest["scenarios"].values() for q in entry["outputs"]})
    unknown = [q for q in names if q not in known]
    if unknown:
        raise VerifyError(f"--quantities: no quantity(ies) {unknown} in "
                          f"{os.path.join(golden, 'manifest.json')}; it has {known}")
    return names
