"""``python -m mpibn explain``: follow the numbers through SyncBatchNorm, rank by rank.

A tiny run (C = 2 channels, a handful of samples, 4 ranks, groups
[[0, 1], [2, 3]], uneven shards, rank 3 empty) of the real layer,
``mpibn.SyncBatchNorm``, printed step by step:

1. each rank's shard and its local moments (n_r, mean_r, m2_r)
                                               ``functional.batch_norm_stats``;
2. the forward Allreduce: the row each rank sent and the table that came
   back (layout in ``mpibn.comm``);
3. the group's statistics                      ``functional.merge_stats``,
   next to the mean of the ranks' means, which is wrong;
4. one element of y worked out by hand         ``functional.batch_norm_elemt``;
5. backward: the two local sums each rank sent ``functional.batch_norm_backward_reduce``
   and the group's sums that came back;
6. one element of dx worked out by hand        ``functional.batch_norm_backward_elemt``;
7. a check against plain batch norm of each group's concatenated batch.

Every number about the exchange is the one the layer really sent and
received: the group communicator's ``allreduce_sum`` is wrapped, on this
process only, by ``BufferTap``, which copies the buffer just before and just
after each collective. Nothing the layer sends is recomputed here. The
default output shows channel 0 and each group's table once; ``--full``
shows every channel and every rank's copy of every buffer. Every "check"
line must say True; the exit code is 1 otherwise. The narrative is derived
in docs/derivation.md.
"""
import numpy as np

from .. import functional as F
from ..errors import N_DETAILS

HEADER = 4 + N_DETAILS      # as mpibn.comm.HEADER; imported without starting MPI

DEFAULT_GROUPS = [[0, 1], [2, 3]]
DEFAULT_SHARDS = (3, 1, 2, 0)
MU, SIGMA = (10.0, -2.0), (1.0, 0.5)      # per-channel mean and std of the data


class BufferTap:
    """Copies of the buffer around each Allreduce of one GroupComm.

    ``calls`` is a list of (sent, received) float64 arrays, one pair per
    collective. ``close()`` restores the original method.
    """

    def __init__(self, group):
        self.group = group
        self.calls = []
        inner = group.allreduce_sum

        def tapped(buf, *args, **kwargs):
            sent = buf.copy()
            out = inner(buf, *args, **kwargs)
            self.calls.append((sent, out.copy()))
            return out

        group.allreduce_sum = tapped     # instance attribute: shadows the method

    def close(self):
        del self.group.allreduce_sum


class Report:
    """Lines written on every rank, printed by rank 0 in rank order.

    ``step`` is collective: every rank calls it at the same point (lowercase
    gather: a few lines of text).
    """

    def __init__(self, comm):
        self.comm = comm
        self.lines = []

    def __call__(self, text=""):
        for item in text if isinstance(text, list) else [text]:
            self.lines.extend(str(item).split("\n"))

    def step(self, title, intro=""):
        gathered = self.comm.gather(self.lines, root=0)
        self.lines = []
        if self.comm.Get_rank() != 0:
            return
        print(f"\n== {title} " + "=" * max(0, 76 - len(title)))
        if intro:
            print(intro)
        for rank, lines in enumerate(gathered):
            if lines:
                print(f"rank {rank}: " + lines[0])
                for line in lines[1:]:
                    print("        " + line)


def shard_sizes(size, shards=None):
    """Samples per rank: ``shards`` if given, else 3, 1, 2, 0 (cycled for other sizes)."""
    if shards is not None:
        return list(shards)
    return [DEFAULT_SHARDS[r % len(DEFAULT_SHARDS)] for r in range(size)]


def default_groups(size):
    return DEFAULT_GROUPS if size == 4 else None


def check_setup(groups, shards, size):
    """Why this example cannot run on ``size`` ranks, or None.

    Pure Python (no MPI), so the launcher can refuse before starting
    mpiexec; the layer validates ``groups`` again on every rank.
    """
    if len(shards) != size:
        return f"--shards gives {len(shards)} sizes for {size} ranks"
    listed = [r for g in (groups or []) for r in g]
    if any(isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < size for r in listed):
        return f"--groups {groups}: rank ids must be ints in [0, {size})"
    if len(set(listed)) != len(listed) or any(not g for g in groups or []):
        return f"--groups {groups}: groups must be non-empty and no rank id may repeat"
    for rank in range(size):
        mine = next((g for g in groups if rank in g), [rank]) if groups is not None else range(size)
        if sum(shards[r] for r in mine) < 2:
            return (f"rank {rank}'s group {list(mine)} holds {sum(shards[r] for r in mine)} samples "
                    f"in all; training batch norm needs at least 2 (give it more with --shards)")
    return None


def make_data(total, channels, seed):
    """The whole batch, the same on every rank (seeded); values rounded to one
    decimal so that a reader can redo the sums by hand. dy is never all ones
    (for which dx of batch norm is exactly zero)."""
    rng = np.random.default_rng(seed)
    mu = np.resize(MU, channels)
    sigma = np.resize(SIGMA, channels)
    x = np.round(rng.normal(mu, sigma, (total, channels)), 1)
    dy = np.round(rng.normal(0.0, 1.0, (total, channels)), 1)
    gamma = np.resize([1.5, 0.5], channels)
    beta = np.resize([0.1, -0.2], channels)
    return x, dy, gamma, beta


def _vec(a, digits):
    return "[" + ", ".join(f"{v:.{digits}g}" for v in np.ravel(a)) + "]"


def _num(a, digits, channels):
    """Channel 0 alone as a number (short mode), or every channel as a vector."""
    a = np.ravel(a)
    return f"{a[0]:.{digits}g}" if channels is None else _vec(a[:channels], digits)


def _worked(name, formula, value, digits, channels):
    """A formula worked out with channel 0's numbers: its channel-0 result,
    then (full mode) the result for every channel."""
    line = f"{name}{'' if channels is None else '[0]'} = {formula} = {np.ravel(value)[0]:.{digits}g}"
    return line if channels is None else f"{line}; every channel: {_num(value, digits, channels)}"


def _nested(a, digits):
    """A 2-D array as nested lists, like x.tolist() (rows are samples)."""
    return "[" + ", ".join(_vec(row, digits) for row in np.reshape(a, (len(a), -1))) + "]"


def _p(v, digits):
    """A number for a worked formula: negative ones in parentheses."""
    return f"({v:.{digits}g})" if v < 0 else f"{v:.{digits}g}"


def _tag(layer_tag, call):
    """The tag's numbers as a reader counts: layers from 1, and which pass.

    The layer writes 2 * (its number) forward and that + 1 backward."""
    if layer_tag == 0:
        return "no tag"
    which = "forward" if int(layer_tag) % 2 == 0 else "backward"
    return f"layer {int(layer_tag) // 2} {which}, call {int(call)}"


def _row(row, channels, names, digits, full):
    """One buffer row: header decoded, payload by name."""
    k = len(names)
    payload = row[HEADER:].reshape(k, -1)
    shown = payload if full else payload[:, :1]
    parts = " ".join(f"{name}={_vec(p, digits)}" for name, p in zip(names, shown))
    head = f"status {int(row[0])}, count {int(row[1])}, {_tag(row[2], row[3])}"
    if full:
        head += " | details " + ",".join(str(int(v)) for v in row[4:HEADER])
    return f"[{head} | {parts}]"


def _table(buf, ranks, names, digits, full):
    return "\n".join(f"row {r} (rank {ranks[r]}): {_row(buf[r], None, names, digits, full)}"
                     for r in range(buf.shape[0]))


class Checks:
    """Named True/False checks of one rank; every one is printed and must hold."""

    def __init__(self):
        self.results = []

    def __call__(self, name, value):
        value = bool(value)
        self.results.append((name, value))
        return f"check: {name}: {value}"

    @property
    def ok(self):
        return all(v for _, v in self.results)


def reference(x, dy, gamma, beta, eps):
    """Textbook batch norm of a whole (B, C) batch in float64, written out
    independently of mpibn.functional: (y, dx, mean, var)."""
    mean = x.mean(axis=0)
    var = ((x - mean) ** 2).mean(axis=0)
    xhat = (x - mean) / np.sqrt(var + eps)
    y = gamma * xhat + beta
    dxhat = dy * gamma
    dx = (dxhat - dxhat.mean(axis=0) - xhat * (dxhat * xhat).mean(axis=0)) / np.sqrt(var + eps)
    return y, dx, mean, var


def run(args):
    from mpi4py import MPI
    from ..comm import validate_process_groups
    from ..layer import SyncBatchNorm

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    groups = args.groups if args.groups is not None else default_groups(size)
    shards = shard_sizes(size, args.shards)
    problem = check_setup(groups, shards, size)
    if problem is None:
        try:
            validate_process_groups(groups, size)
        except (TypeError, ValueError) as exc:
            problem = str(exc)
    if problem is not None:                    # the same verdict on every rank
        if rank == 0:
            print(f"python -m mpibn explain: error: {problem}")
        return 2
    full = bool(getattr(args, "full", False))
    d = digits = args.digits
    C = args.channels
    shown = C if full else None                # None: channel 0 as a plain number
    cuts = np.concatenate([[0], np.cumsum(shards)])
    lo, hi = int(cuts[rank]), int(cuts[rank + 1])
    n_r = hi - lo
    x_all, dy_all, gamma, beta = make_data(int(cuts[-1]), C, args.seed)
    x, dy = x_all[lo:hi], dy_all[lo:hi]
    names_fwd, names_bwd = ("mean", "m2"), ("sum_dy", "sum_dy_xhat")

    bn = SyncBatchNorm(C, gamma_init=gamma, beta_init=beta, process_groups=groups,
                       dtype=np.float64).set_train()
    gc = bn.group_comm
    members = list(gc.ranks)
    first = gc.rank == 0                       # speaks for its group in the short output
    P = gc.size
    say = Report(comm)
    check = Checks()

    def show(line, quiet=False):
        """A check line: always with --full or when False; else only if not quiet."""
        if full or not quiet or line.endswith("False"):
            say(line)

    if rank == 0:
        print(f"SyncBatchNorm(num_features={C}, eps={bn.eps}, momentum={bn.momentum}, "
              f"process_groups={groups}) on {size} ranks, float64, x of shape (n_r, {C})")
        print(f"gamma = {_vec(gamma, d)}, beta = {_vec(beta, d)}; moving_mean starts at 0, "
              f"moving_variance at 1")
        print("Channel 0 only, each group's table once" if not full else
              "Every channel, every rank's copy of every buffer")

    # 1. shards and local moments --------------------------------------------------
    tap = BufferTap(gc)
    y = bn(x)                                   # the forward pass, with its one Allreduce
    width = bn._exchange.width                  # this layer's part of the group's buffer
    sent, back = (a[:, :width] for a in tap.calls[0])
    # The local moments are read from the row this rank sent, not recomputed.
    count = int(sent[gc.rank, 1])
    mean_r, m2_r = sent[gc.rank, HEADER:].reshape(2, C)
    alone = "" if P > 1 else "  (alone: plain local batch norm, nothing is sent)"
    if full:
        say(f"{n_r} sample{'s' * (n_r != 1)}, group ranks {members}{alone}")
        say(f"x = {x.tolist()}" if n_r else f"x is empty, shape (0, {C})")
        say(f"n_r = {count}, mean_r = {_vec(mean_r, d)}, m2_r = {_vec(m2_r, d)}")
    else:
        xs = "x[:, 0] = [" + ", ".join(f"{v:g}" for v in x[:, 0]) + "]" if n_r else "x is empty"
        say(f"{xs} -> n_r = {count}, mean_r = {mean_r[0]:.{d}g}, "
            f"m2_r = {m2_r[0]:.{d}g}   (group {members}){alone}")
    say.step("1. shards and local moments  (functional.batch_norm_stats)",
             "n_r = values per channel; mean_r = sum(x)/n_r; m2_r = sum((x - mean_r)^2), centred\n"
             "about the rank's own mean (never a raw sum of squares). An empty shard sends 0, 0, 0.")

    # 2. the forward Allreduce -----------------------------------------------------
    others_zero = not np.any(np.delete(sent, gc.rank, axis=0))
    own_back = np.array_equal(back[gc.rank], sent[gc.rank])
    tables = comm.allgather(back.tobytes())
    same = all(tables[r] == tables[rank] for r in members)
    if full:
        say("sent:\n" + _table(sent, members, names_fwd, d, full))
        say("came back:\n" + _table(back, members, names_fwd, d, full))
    elif first:
        say(_table(back, members, names_fwd, d, full))
    show(check("only its own row was non-zero in what it sent", others_zero), quiet=True)
    show(check("its own row came back bitwise unchanged (v + 0 = v)", own_back), quiet=True)
    show(check(f"bitwise the same table on group ranks {members}", same), quiet=not first)
    say.step("2. the forward Allreduce(SUM) over the group: every rank's row, bit for bit",
             f"Buffer (P, {HEADER} + 2C): one row per group rank, [status, count, layer tag, call |\n"
             "8 details | payload]. Each rank fills only its own row; every column then has one\n"
             "non-zero entry, so the SUM is exact and works as an allgather of the rows.\n"
             "Shown: the table that came back" + (" on every rank." if full else
                                                   ", once per group (channel 0)."))

    # 3. group statistics ------------------------------------------------------------
    counts, rows = back[:, 1], back[:, HEADER:].reshape(-1, 2, C)
    N, mean, M2 = F.merge_stats(counts, rows[:, 0], rows[:, 1])
    var, s = bn.batch_var, F.inv_std_from_var(bn.batch_var, bn.eps)
    m = bn.momentum
    if first or full:
        terms = " + ".join(f"{int(c)}*{_p(r[0, 0], d)}" for c, r in zip(counts, rows))
        say(f"N = {N}; " + _worked("mean", f"({terms})/{N}", mean, d, shown))
        if P > 1:
            naive = rows[:, 0].mean(axis=0)
            listed = " + ".join(f"{_p(r[0, 0], d)}" for r in rows)
            say("   (averaging the ranks' means instead: " + _worked("mean", f"({listed})/{P}", naive,
                d, shown) + ": wrong, the counts differ)")
        within = rows[:, 1].sum(axis=0)
        say(f"M2 = sum m2_r + sum n_r (mean_r - mean)^2 = {_num(within, d, shown)} + "
            f"{_num(M2 - within, d, shown)} = {_num(M2, d, shown)}")
        say(f"var = M2/N = {_num(var, d, shown)}; s = 1/sqrt(var + eps) = {_num(s, d, shown)}")
        if N > 1:
            say(f"moving_mean = {m:g}*0 + {1 - m:g}*mean = {_num(bn.moving_mean.data, d, shown)}; "
                f"moving_variance = {m:g}*1 + {1 - m:g}*M2/(N-1) = "
                f"{_num(bn.moving_variance.data, d, shown)}")
    agrees = np.array_equal(mean, bn.batch_mean) and np.array_equal(M2 / N, bn.batch_var)
    show(check("merge_stats of that table gives bitwise the layer's mean and var", agrees),
         quiet=not first)
    say.step("3. group statistics  (functional.merge_stats, inv_std_from_var, running_update)",
             "Chan's merge: the rows are combined in rank order on every rank, so the ranks of a\n"
             "group get the same bits. The moving variance takes the unbiased M2/(N-1), N the group's.")

    # 4. output ----------------------------------------------------------------------
    if n_r:
        say(f"y[0,0] = gamma*(x - mean)*s + beta = {_p(gamma[0], d)}*({_p(x[0, 0], d)} - "
            f"{_p(mean[0], d)})*{_p(s[0], d)} + {_p(beta[0], d)} = {y[0, 0]:.{d}g}")
        if full:
            say(f"y = {_nested(y, d)}")
    else:
        say(f"y is empty, shape {y.shape}")
    say.step("4. output  (functional.batch_norm_elemt)",
             "y = gamma * (x - mean) * s + beta, with the group's mean and s.")

    # 5. backward sums ---------------------------------------------------------------
    dx = bn.backward(dy)
    sent_b, back_b = (a[:, :width] for a in tap.calls[1])
    tap.close()
    # The two local sums are read from the row this rank sent.
    sum_dy, sum_dy_xhat = sent_b[gc.rank, HEADER:].reshape(2, C)
    if full and n_r:
        say(f"dy = {dy.tolist()}")
    say(f"{'sent' if P > 1 else 'local (not sent)'} sum_dy = {_num(sum_dy, d, shown)}, sum_dy_xhat = {_num(sum_dy_xhat, d, shown)}"
        + ("" if n_r else "  (empty shard: zeros)"))
    show(check("they are bitwise this rank's dbeta and dgamma",
               np.array_equal(sum_dy, bn.beta.grad) and np.array_equal(sum_dy_xhat, bn.gamma.grad)),
         quiet=True)
    g_dy, g_dy_xhat = back_b[:, HEADER:].reshape(-1, 2, C).sum(axis=0)
    if full:
        say("came back:\n" + _table(back_b, members, names_bwd, d, full))
    if first or full:
        say(f"group sums (rows added in rank order): sum_dy = {_num(g_dy, d, shown)}, "
            f"sum_dy_xhat = {_num(g_dy_xhat, d, shown)}")
    tables_b = comm.allgather(back_b.tobytes())
    show(check(f"bitwise the same table on group ranks {members}",
               all(tables_b[r] == tables_b[rank] for r in members)), quiet=not first)
    say.step("5. backward: the two local sums, the second Allreduce  "
             "(functional.batch_norm_backward_reduce)",
             "Per channel sum(dy) and sum(dy * xhat) (dy random, never all ones), as the payload\n"
             "of the same buffer (its count field is left 0: backward reuses forward's N).\n"
             "They are also this rank's dbeta and dgamma: local shares that the training step\n"
             "sums over the ranks like every other parameter gradient.")

    # 6. dx --------------------------------------------------------------------------
    if n_r and (first or full):
        xhat00 = (x[0, 0] - mean[0]) * s[0]
        say("dx[0,0] = gamma*s*(dy - sum_dy/N - xhat*sum_dy_xhat/N)")
        say(f"        = {_p(gamma[0], d)}*{_p(s[0], d)}*({_p(dy[0, 0], d)} - {_p(g_dy[0], d)}/{N}"
            f" - {_p(xhat00, d)}*{_p(g_dy_xhat[0], d)}/{N}) = {dx[0, 0]:.{d}g}")
    elif full:
        say("dx is empty")
    say.step("6. input gradient  (functional.batch_norm_backward_elemt)",
             "dx needs only the group's two sums, N, and what forward kept (x, mean, s).")

    # 7. independent check: textbook batch norm of each group's concatenated batch.
    idx = np.concatenate([np.arange(cuts[r], cuts[r + 1]) for r in members]).astype(int)
    y_ref, dx_ref, mean_ref, var_ref = reference(x_all[idx], dy_all[idx], gamma, beta, bn.eps)
    mine = slice(sum(shards[r] for r in members[:gc.rank]), None)
    err_y = float(np.abs(y - y_ref[mine][:n_r]).max(initial=0.0))
    err_dx = float(np.abs(dx - dx_ref[mine][:n_r]).max(initial=0.0))
    err_stats = float(max(np.abs(mean - mean_ref).max(), np.abs(M2 / N - var_ref).max()))
    # Summing the local dgamma over the group gives the concatenated batch's dgamma.
    shares = comm.allgather(bn.gamma.grad)
    dgamma_ref = (dy_all[idx] * (x_all[idx] - mean_ref) / np.sqrt(var_ref + bn.eps)).sum(axis=0)
    err_dgamma = float(np.abs(sum(shares[r] for r in members) - dgamma_ref).max())
    say(f"max abs difference: y {err_y:.1e}, dx {err_dx:.1e}, mean and var {err_stats:.1e}, "
        f"group's sum of dgamma {err_dgamma:.1e}")
    show(check("all within 1e-12, and " + ("2 Allreduce calls" if P > 1 else "no Allreduce (alone)"),
               max(err_y, err_dx, err_stats, err_dgamma) < 1e-12
               and gc.allreduce_calls == (2 if P > 1 else 0)), quiet=True)
    say.step("7. check against plain batch norm of each group's concatenated batch",
             "Textbook NumPy formulas, independent of mpibn.functional.")
    results = comm.gather(check.results, root=0)
    ok = comm.allreduce(int(check.ok), op=MPI.MIN)
    if rank == 0:
        total = sum(len(r) for r in results)
        print(f"\n{total} checks on {size} ranks ({'all printed' if full else 'failures and group checks printed'}): "
              + ("all True. One Allreduce forward and one backward in each group of two or more "
                 "ranks (none for a rank alone); every group's result equals its concatenated batch." if ok else "MISMATCH: some check is False"))
    bn.close()
    return 0 if ok else 1
