"""Command line: ``mpibn COMMAND --help`` (or ``python -m mpibn COMMAND --help``)."""
import argparse
import json
import os
import sys

from .launch import relaunch, under_mpiexec


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
    _add_explain(sub)
    _add_golden_verify(sub)
    bench = sub.add_parser(
        "bench", help="time mpibn next to torch CPU, naive NumPy and a memory copy",
        description="Runs mpibn.cli.bench with the arguments that follow; see docs/performance.md. "
                    "Everything after 'bench' goes to it: mpibn bench --help shows its options.",
        add_help=False)
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _add_golden_verify(sub):
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

    verify = sub.add_parser(
        "verify", help="compare another backend's results with a golden directory",
        description="Compare RESULTS/<scenario>/rank<r>.npz (the golden layout, output keys) with "
                    "GOLDEN and print max abs / max rel (normwise) / max ulps per scenario and "
                    "quantity. Exit 0 when all pass, 1 on a failure or when nothing was compared, "
                    "2 on a missing or malformed file or key or an unknown scenario or quantity.")
    verify.add_argument("golden", metavar="GOLDEN")
    verify.add_argument("results", metavar="RESULTS")
    verify.add_argument("--rtol", type=float, default=None,
                        help="pass when max abs <= atol + rtol * max|expected| "
                             "(default 32 eps of the result's dtype)")
    verify.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0)")
    verify.add_argument("--max-ulps", type=int, default=None, help="also require max ulps <= this")
    verify.add_argument("--scenarios", metavar="NAMES", help="comma-separated subset")
    verify.add_argument("--quantities", metavar="NAMES", help="comma-separated subset (y,dx,...)")
    verify.add_argument("--skip-missing", action="store_true",
                        help="report scenarios or keys the results lack as 'missing' instead of an error")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:               # every later argument belongs to mpibn.cli.bench
        from .bench.run import main as bench_main
        return bench_main(argv[1:], prog=f"{prog()} bench")
    args = _parser().parse_args(argv)
    if args.command in ("demo", "explain", "golden"):
        _resolve_np(args)
    if args.command == "demo":
        if args.batch < 2 or args.channels < 1:
            _parser().error("--batch must be at least 2 and --channels at least 1")
        if not under_mpiexec() and args.np > 1:
            return relaunch(args.np, argv, timeout=120)
        from . import demo as demo_module
        return demo_module.run(args)
    if args.command == "explain":
        if not 1 <= args.channels <= 8 or not 1 <= args.digits <= 17:
            _parser().error("--channels must be in 1..8 and --digits in 1..17")
        from . import explain as explain_module
        if not under_mpiexec():
            groups = args.groups if args.groups is not None else explain_module.default_groups(args.np)
            problem = explain_module.check_setup(
                groups, explain_module.shard_sizes(args.np, args.shards), args.np)
            if problem:
                _parser().error(problem)
        if not under_mpiexec() and args.np > 1:
            return relaunch(args.np, argv, timeout=120)
        return explain_module.run(args)
    if args.command == "golden":
        if not under_mpiexec() and args.np > 1:
            return relaunch(args.np, argv, timeout=600)
        from .. import golden as golden_module
        return golden_module.run(args)
    if args.command == "verify":
        from .. import verify as verify_module
        return verify_module.run(args)
    return 2


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


if __name__ == "__main__":
    sys.exit(main())
