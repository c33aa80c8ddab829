#!/usr/bin/env python3
"""Data-parallel training with SyncBatchNorm equals training on the concatenated batch.

    python scripts/train_data_parallel.py                 # relaunches itself on 4 ranks
    mpiexec -n 4 python -m mpi4py scripts/train_data_parallel.py --steps 150

A small network, written out in NumPy with an explicit backward pass::

    x (B, 64) -> h = x @ W1 -> z = BN(h) -> a = relu(z) -> logits = a @ W2 + b2 -> softmax CE

is trained with plain SGD on scikit-learn's bundled digits (8x8 images, 10
classes; no download; a synthetic set of the same shape when scikit-learn
is absent), in float64, three ways:

* ``reference``: one process, the whole global batch, a textbook batch norm
  written out below (``TextbookBN``), independent of mpibn;
* ``sync``: 4 ranks, each with an uneven share of the same global batch
  (4:3:2:1), BN = ``mpibn.SyncBatchNorm`` over all ranks;
* ``local``: the same 4 ranks, BN = ``mpibn.SyncBatchNorm`` with singleton
  ``process_groups`` (plain per-rank batch norm, what you get without sync).

Data parallelism here: every rank's loss is its part of the *global* mean,
``L_r = sum_{i in rank r} CE_i / B`` with B the global batch size, so that
``L = sum_r L_r`` is the loss of the concatenated batch. Every parameter's
gradient on a rank is then that rank's contribution to dL/dp, and one SUM
Allreduce of all of them (a single flat "bucket") gives the exact gradient.
This covers gamma and beta too: ``SyncBatchNorm.backward`` leaves in
``gamma.grad``/``beta.grad`` the rank's own share, summed here with the rest.
(PyTorch's DDP *averages* instead, because each rank's loss is its local mean
over an equal shard; the two agree when shards are equal, and only the sum is
right when they are not: docs/derivation.md, "gamma and beta stay local".)
The dx that SyncBatchNorm returns is already the gradient of the whole L, so
dW1 needs nothing more.

The script prints the loss curves, the test accuracy and the largest
parameter difference from the reference, and writes a plot of both curves
(training.png in the current directory by default, ``--plot docs/training.png``
for the committed figure; needs matplotlib, the ``examples`` extra).
What it prints with the defaults (global batch 100, shards 40/30/20/10) and
with small per-rank batches (``--batch 20``: shards 8/6/4/2), quoted and
held by tests/test_docs_numbers.py: docs/examples.md, "Data-parallel
training". Synchronised BN matters when each device holds few samples.
"""
import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# -- data ---------------------------------------------------------------------------------

def load_data(source="auto", seed=0):
    """(x_train, y_train, x_test, y_test, name): 64 features in [0, 1], 10 classes.

    ``source``: 'digits' (scikit-learn's bundled 1797 images), 'synthetic'
    (10 Gaussian clusters, 1800 points, no dependency) or 'auto' (digits
    when scikit-learn is installed).
    """
    if source in ("auto", "digits"):
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            if source == "digits":
                raise SystemExit("the digits data set needs scikit-learn: "
                                 "pip install 'mpibn[examples]'") from None
        else:
            digits = load_digits()
            x, y, name = digits.data / 16.0, digits.target, "digits (scikit-learn)"
            source = "digits"
    if source in ("auto", "synthetic"):
        rng = np.random.default_rng(1234)
        centres = rng.uniform(0, 1, (10, 64))
        y = np.repeat(np.arange(10), 180)
        x = np.clip(centres[y] + rng.normal(0, 0.25, (y.size, 64)), 0, 1)
        name = "synthetic (10 Gaussian clusters)"
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order].astype(np.float64), y[order]
    cut = len(y) - 300
    return x[:cut], y[:cut], x[cut:], y[cut:], name


def shard_cuts(batch, size):
    """Uneven shares of a global batch, in proportion size : size-1 : ... : 1."""
    weights = np.arange(size, 0, -1, dtype=float)
    return np.concatenate([[0], np.round(np.cumsum(weights) / weights.sum() * batch)]).astype(int)


def split_text(batch, size):
    return "/".join(str(n) for n in np.diff(shard_cuts(batch, size)))


# -- an independent, textbook batch norm for the single-process reference ----------------

class _Param:
    def __init__(self, data):
        self.data, self.grad = data, None


class TextbookBN:
    """Batch norm of a (B, C) batch, the formulas of Ioffe & Szegedy (2015)
    written out directly; running statistics with MindSpore's momentum
    (weight of the old value) and the unbiased variance."""

    def __init__(self, channels, momentum=0.9, eps=1e-5):
        self.gamma, self.beta = _Param(np.ones(channels)), _Param(np.zeros(channels))
        self.moving_mean, self.moving_variance = _Param(np.zeros(channels)), _Param(np.ones(channels))
        self.momentum, self.eps, self.training = momentum, eps, True

    def set_train(self, mode=True):
        self.training = mode
        return self

    def __call__(self, h):
        if not self.training:
            return (self.gamma.data * (h - self.moving_mean.data)
                    / np.sqrt(self.moving_variance.data + self.eps) + self.beta.data)
        m = h.shape[0]
        mean = h.mean(axis=0)
        var = ((h - mean) ** 2).mean(axis=0)
        self.xhat = (h - mean) / np.sqrt(var + self.eps)
        self.inv_std = 1.0 / np.sqrt(var + self.eps)
        mo = self.momentum
        self.moving_mean.data = mo * self.moving_mean.data + (1 - mo) * mean
        self.moving_variance.data = mo * self.moving_variance.data + (1 - mo) * var * m / (m - 1)
        return self.gamma.data * self.xhat + self.beta.data

    def backward(self, dz):
        self.gamma.grad = (dz * self.xhat).sum(axis=0)
        self.beta.grad = dz.sum(axis=0)
        dxhat = dz * self.gamma.data
        return self.inv_std * (dxhat - dxhat.mean(axis=0) - self.xhat * (dxhat * self.xhat).mean(axis=0))

    def close(self):
        pass


# -- the network ----------------------------------------------------------------------------

class Net:
    """x -> x @ W1 -> BN -> relu -> @ W2 + b2 -> logits (no bias before BN: beta is it)."""

    def __init__(self, bn, features=64, hidden=32, classes=10, seed=0):
        rng = np.random.default_rng(seed)           # the same weights on every rank
        self.W1 = rng.normal(0, 1 / np.sqrt(features), (features, hidden))
        self.W2 = rng.normal(0, 1 / np.sqrt(hidden), (hidden, classes))
        self.b2 = np.zeros(classes)
        self.bn = bn

    def params(self):
        """Name -> array; the BN arrays are the layer's own (updated in place)."""
        return {"W1": self.W1, "gamma": self.bn.gamma.data, "beta": self.bn.beta.data,
                "W2": self.W2, "b2": self.b2}

    def loss_and_grads(self, x, labels, global_batch):
        """This rank's share of the global mean cross-entropy and of every gradient."""
        h = x @ self.W1
        z = self.bn(h)
        a = np.maximum(z, 0.0)
        logits = a @ self.W2 + self.b2
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        rows = np.arange(len(labels))
        loss = -np.log(p[rows, labels]).sum() / global_batch
        dlogits = p
        dlogits[rows, labels] -= 1.0
        dlogits /= global_batch
        dz = (dlogits @ self.W2.T) * (z > 0)
        dh = self.bn.backward(dz)                    # one Allreduce inside, for sync BN
        grads = {"W1": x.T @ dh, "gamma": self.bn.gamma.grad, "beta": self.bn.beta.grad,
                 "W2": a.T @ dlogits, "b2": dlogits.sum(axis=0)}
        return loss, grads

    def accuracy(self, x, labels):
        self.bn.set_train(False)                     # moving statistics, no communication
        a = np.maximum(self.bn(x @ self.W1), 0.0)
        self.bn.set_train(True)
        return float(((a @ self.W2 + self.b2).argmax(axis=1) == labels).mean())


def flat(params):
    return np.concatenate([np.ravel(v) for v in params.values()])


def make_bn(kind, hidden, comm):
    if kind == "reference":
        return TextbookBN(hidden)
    from mpibn import SyncBatchNorm
    groups = None if kind == "sync" else [[r] for r in range(comm.Get_size())]
    return SyncBatchNorm(hidden, process_groups=groups, comm=comm, dtype=np.float64).set_train()


def train(kind, data, comm=None, steps=150, batch=100, lr=0.5, hidden=32, seed=0, progress=None):
    """Train one way; returns a dict with 'loss' (per step, global), 'params'
    (per step, flattened, after the update), 'moving' and 'accuracy'.

    kind: 'reference' (one process, whole batch, no communication) or 'sync'
    / 'local' (data-parallel over ``comm``; a collective: every rank calls).
    """
    x_train, y_train, x_test, y_test = data[:4]
    size, rank = (1, 0) if kind == "reference" else (comm.Get_size(), comm.Get_rank())
    cuts = shard_cuts(batch, size)
    if np.diff(cuts).min() < 2:
        raise ValueError(f"batch {batch} over {size} ranks leaves a shard with fewer than 2 samples")
    net = Net(make_bn(kind, hidden, comm), hidden=hidden, seed=seed)
    params = net.params()
    rng = np.random.default_rng(seed + 1)           # the same batches on every rank
    order, at = rng.permutation(len(y_train)), 0
    losses, history = [], []
    for step in range(steps):
        if at + batch > len(order):
            order, at = rng.permutation(len(y_train)), 0
        idx = order[at:at + batch][cuts[rank]:cuts[rank + 1]]
        at += batch
        loss, grads = net.loss_and_grads(x_train[idx], y_train[idx], batch)
        bucket = np.concatenate([flat(grads), [loss]])
        if kind != "reference":
            from mpi4py import MPI
            # One SUM Allreduce of every gradient contribution and the loss.
            comm.Allreduce(MPI.IN_PLACE, bucket, op=MPI.SUM)
        at_grad = 0
        for name, value in params.items():
            value -= lr * bucket[at_grad:at_grad + value.size].reshape(value.shape)
            at_grad += value.size
        losses.append(float(bucket[-1]))
        history.append(flat(params))
        if progress:
            progress(step + 1, steps, losses[-1])
    moving = np.concatenate([net.bn.moving_mean.data, net.bn.moving_variance.data])
    result = {"loss": np.array(losses), "params": np.array(history), "moving": moving,
              "accuracy": net.accuracy(x_test, y_test)}
    net.bn.close()
    return result


# -- the comparison, the report and the plot ------------------------------------------------

def compare(runs):
    """Largest differences of 'sync' and 'local' from 'reference'."""
    ref = runs["reference"]
    out = {}
    for kind in ("sync", "local"):
        run = runs[kind]
        out[kind] = {"loss": float(np.abs(run["loss"] - ref["loss"]).max()),
                     "params": float(np.abs(run["params"][-1] - ref["params"][-1]).max()),
                     "moving": float(np.abs(run["moving"] - ref["moving"]).max()),
                     "per_step": np.abs(run["params"] - ref["params"]).max(axis=1)}
    return out


def plot(runs, diffs, path, size, data_name):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(runs["reference"]["loss"]) + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(steps, runs["reference"]["loss"], color="0.6", lw=5, label="one process, whole batch")
    ax1.plot(steps, runs["sync"]["loss"], color="tab:blue", lw=1.5,
             label=f"{size} ranks, SyncBatchNorm")
    ax1.plot(steps, runs["local"]["loss"], color="tab:orange", lw=1.2, ls="--",
             label=f"{size} ranks, per-rank BatchNorm")
    ax1.set(xlabel="SGD step", ylabel="training loss (global batch)", yscale="log",
            title="Loss curves")
    ax1.legend(frameon=False)
    floor = 1e-18
    ax2.plot(steps, np.maximum(diffs["sync"]["per_step"], floor), color="tab:blue",
             label="SyncBatchNorm")
    ax2.plot(steps, np.maximum(diffs["local"]["per_step"], floor), color="tab:orange", ls="--",
             label="per-rank BatchNorm")
    ax2.axhline(1e-10, color="0.5", lw=0.8, ls=":")
    ax2.text(steps[0], 2e-10, "1e-10: the bound checked", ha="left", va="bottom", color="0.4",
             fontsize=8)
    ax2.set(xlabel="SGD step", ylabel="max |weight - one-process weight|", yscale="log",
            ylim=(floor, 10), title="Distance from one-process training")
    ax2.legend(frameon=False, loc="center right", bbox_to_anchor=(1.0, 0.6))
    fig.suptitle(f"Data-parallel training on {data_name}, float64, uneven shards "
                 f"{split_text(runs['batch'], size)}", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="train_data_parallel.py",
        description="Train a small net data-parallel with SyncBatchNorm and show that it equals "
                    "one-process training on the concatenated batch, while per-rank BatchNorm "
                    "does not. Relaunches itself under mpiexec when not started by one.")
    parser.add_argument("-n", "--np", type=int, default=4, help="ranks to launch (default 4)")
    parser.add_argument("--steps", type=int, default=150, help="SGD steps (default 150)")
    parser.add_argument("--batch", type=int, default=100, help="global batch size (default 100)")
    parser.add_argument("--lr", type=float, default=0.5, help="learning rate (default 0.5)")
    parser.add_argument("--hidden", type=int, default=32, help="hidden units (default 32)")
    parser.add_argument("--data", choices=("auto", "digits", "synthetic"), default="auto",
                        help="data set (default: digits if scikit-learn is installed)")
    # Not docs/training.png: a run must not overwrite the committed figure unless asked to.
    parser.add_argument("--plot", default="training.png",
                        help="where to write the plot (default training.png in the current directory; "
                             "--plot docs/training.png refreshes the committed figure)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the plot")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 1 or args.hidden < 1 or args.np < 1 or not args.lr > 0:
        parser.error("--steps, --hidden and --np must be at least 1 and --lr positive")
    if np.diff(shard_cuts(args.batch, args.np)).min() < 2:
        parser.error(f"--batch {args.batch} is too small: {args.np} uneven shards "
                     f"(in proportion {args.np}:...:1) need at least 2 samples each")

    sys.path.insert(0, ROOT)
    from mpibn.cli.launch import find_mpiexec, under_mpiexec
    if not under_mpiexec() and args.np > 1:
        import subprocess
        cmd = [find_mpiexec(), "-n", str(args.np), sys.executable, "-m", "mpi4py",
               os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, timeout=600).returncode

    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    data = load_data(args.data, args.seed)
    started = time.time()

    def progress(kind):
        def report(step, steps, loss):
            if rank == 0 and (step % max(1, steps // 5) == 0 or step == steps):
                print(f"  {kind:9s} step {step:4d}/{steps}  loss {loss:.6f}  "
                      f"({time.time() - started:.1f} s)", flush=True)
        return report

    if rank == 0:
        print(f"data: {data[4]}, {len(data[1])} training / {len(data[3])} test samples; "
              f"global batch {args.batch} split {split_text(args.batch, size)} over {size} ranks",
              flush=True)
    opts = dict(steps=args.steps, batch=args.batch, lr=args.lr, hidden=args.hidden, seed=args.seed)
    runs = {"batch": args.batch}
    for kind in ("reference", "sync", "local"):
        # Every rank computes the (cheap) one-process reference itself.
        runs[kind] = train(kind, data, comm, progress=progress(kind), **opts)
    diffs = compare(runs)
    spread = comm.allreduce(float(np.abs(runs["sync"]["params"][-1]
                                         - comm.bcast(runs["sync"]["params"][-1], root=0)).max()),
                            op=MPI.MAX)
    ok = comm.allreduce(int(diffs["sync"]["params"] < 1e-10 and diffs["sync"]["loss"] < 1e-10),
                        op=MPI.MIN)
    # Per-rank BN leaves each rank with moving statistics of its own shard
    # only: the same weights then score differently on each rank.
    local_accuracy = comm.gather(runs["local"]["accuracy"], root=0)
    if rank == 0:
        ref = runs["reference"]
        print(f"\nfinal loss: one process {ref['loss'][-1]:.12f} | "
              f"sync {runs['sync']['loss'][-1]:.12f} | per-rank BN {runs['local']['loss'][-1]:.12f}")
        print(f"test accuracy (eval mode, moving statistics): one process {ref['accuracy']:.3f} | "
              f"sync {runs['sync']['accuracy']:.3f} (every rank) | per-rank BN, each rank with its "
              f"own moving statistics: " + " ".join(f"{a:.3f}" for a in local_accuracy))
        for kind, label in (("sync", "SyncBatchNorm      "), ("local", "per-rank BatchNorm ")):
            d = diffs[kind]
            print(f"{label} vs one process: max |loss diff| {d['loss']:.1e}, max |weight diff| "
                  f"{d['params']:.1e}, max |moving stats diff| {d['moving']:.1e}")
        print(f"largest weight difference between ranks (sync): {spread:.1e}")
        print("sync training equals one-process training on the concatenated batch (to 1e-10)"
              if ok else "MISMATCH: sync training differs from one-process training")
        if not args.no_plot:
            try:
                plot(runs, diffs, args.plot, size, data[4])
                print(f"plot written to {os.path.relpath(args.plot)}")
            except ImportError:
                print("matplotlib is not installed (pip install 'mpibn[examples]'): no plot")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
