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
    return 2


if __name__ == "__main__":
    sys.exit(main())
