"""Command line: ``python -m mpibn COMMAND --help``."""
import argparse
import sys

from .launch import relaunch, under_mpiexec


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m mpibn",
        description="mpibn: reference SyncBatchNorm (MindSpore semantics) in NumPy over MPI.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    demo = sub.add_parser(
        "demo", help="synced statistics over N ranks equal those of the concatenated batch",
        description="Run one training step of SyncBatchNorm over N ranks with uneven shards "
                    "(one may be empty) and compare y, dx and the statistics with a plain "
                    "float64 batch norm of the concatenated batch. Relaunches itself under "
                    "mpiexec when not started by one.")
    demo.add_argument("-n", "--np", type=int, default=4, help="ranks to launch (default 4)")
    demo.add_argument("--batch", type=int, default=10, help="global batch size (default 10)")
    demo.add_argument("--channels", type=int, default=3, help="channels (default 3)")
    demo.add_argument("--offset", type=float, default=5.0, help="mean of the data (default 5)")
    demo.add_argument("--seed", type=int, default=0)

    golden = sub.add_parser(
        "golden", help="write reference inputs and outputs for other backends to match",
        description="Run every scenario (even/uneven/empty shards, groups, 2-D, float32 with "
                    "|mean|/std=1e5, float16, momentum, eval, ...) for two training steps over N "
                    "ranks and write DIR/manifest.json and DIR/<scenario>/rank<r>.npz (inputs and "
                    "mpibn's outputs). Relaunches itself under mpiexec when not started by one.")
    golden.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    golden.add_argument("-n", "--np", type=int, default=4, help="ranks to launch (default 4)")
    golden.add_argument("--scenarios", metavar="NAMES", help="comma-separated subset (default: all)")
    golden.add_argument("--dtype", default="float32", choices=["float16", "float32", "float64"],
                        help="input dtype of the scenarios that do not fix one (default float32)")
    golden.add_argument("--no-exact", action="store_true",
                        help="use the default statistics instead of exact=True")

    verify = sub.add_parser(
        "verify", help="compare another backend's results with a golden directory",
        description="Compare RESULTS/<scenario>/rank<r>.npz (the golden layout, output keys) with "
                    "GOLDEN and print max abs / max rel (normwise) / max ulps per scenario and "
                    "quantity. Exit 0 when all pass, 1 on a failure, 2 on a missing or malformed "
                    "file or key.")
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
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    if args.command == "demo":
        if args.np < 1:
            _parser().error(f"--np must be at least 1, got {args.np}")
        if args.batch < 2 or args.channels < 1:
            _parser().error("--batch must be at least 2 and --channels at least 1")
        if not under_mpiexec() and args.np > 1:
            return relaunch(args.np, argv, timeout=120)
        from . import demo as demo_module
        return demo_module.run(args)
    if args.command == "golden":
        if args.np < 1:
            _parser().error(f"--np must be at least 1, got {args.np}")
        if not under_mpiexec() and args.np > 1:
            return relaunch(args.np, argv, timeout=600)
        from . import golden as golden_module
        return golden_module.run(args)
    if args.command == "verify":
        from . import verify as verify_module
        return verify_module.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
