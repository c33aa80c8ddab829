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
7. a check against plain batch norm of each group's concatenated batch
   (``mpibn.cli.textbook``).

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
from ..comm import HEADER, group_of, validate_process_groups
from ..errors import describe_tag
from . import textbook

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
        mine = group_of(rank, groups) if groups is not None else range(size)
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


def _row(row, channels, names, digits, full):
    """One buffer row: header decoded, payload by name."""
    k = len(names)
    payload = row[HEADER:].reshape(k, -1)
    shown = payload if full else payload[:, :1]
    parts = " ".join(f"{name}={_vec(p, digits)}" for name, p in zip(names, shown))
    tag = describe_tag(row[2:4]) if row[2] else "no tag"     # all zeros: another rank's row
    head = f"status {int(row[0])}, count {int(row[1])}, {tag}"
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



def run(args):
    """Every rank: check the setup, then the seven steps; the exit status (0 when every check holds)."""
    from mpi4py import MPI

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
    walk = Walkthrough(args, comm, groups, shards)
    for step in (walk.intro, walk.moments, walk.forward_table, walk.statistics, walk.output,
                 walk.backward_sums, walk.input_gradient, walk.against_textbook):
        step()
    return walk.summary()


class Walkthrough:
    """One rank's part of the run: its shard, the layer, and one method per printed step.

    Every method is collective (``Report.step`` gathers) and is called in
    order on every rank; later steps read what earlier ones kept on ``self``.
    """

    def __init__(self, args, comm, groups, shards):
        from ..layer import SyncBatchNorm

        self.comm, self.rank, self.size = comm, comm.Get_rank(), comm.Get_size()
        self.groups, self.shards = groups, shards
        self.full = bool(getattr(args, "full", False))
        self.digits, self.channels = args.digits, args.channels
        self.shown = self.channels if self.full else None     # None: channel 0 as a plain number
        self.cuts = np.concatenate([[0], np.cumsum(shards)])
        lo, hi = int(self.cuts[self.rank]), int(self.cuts[self.rank + 1])
        self.n_r = hi - lo
        self.x_all, self.dy_all, self.gamma, self.beta = make_data(int(self.cuts[-1]), self.channels,
                                                                   args.seed)
        self.x, self.dy = self.x_all[lo:hi], self.dy_all[lo:hi]
        self.bn = SyncBatchNorm(self.channels, gamma_init=self.gamma, beta_init=self.beta,
                                process_groups=groups, dtype=np.float64).set_train()
        self.gc = self.bn.group_comm
        self.members = list(self.gc.ranks)
        self.first = self.gc.rank == 0         # speaks for its group in the short output
        self.say = Report(comm)
        self.check = Checks()

    def show(self, line, quiet=False):
        """A check line: always with --full or when False; else only if not quiet."""
        if self.full or not quiet or line.endswith("False"):
            self.say(line)

    def intro(self):
        if self.rank == 0:
            bn, d = self.bn, self.digits
            print(f"SyncBatchNorm(num_features={self.channels}, eps={bn.eps}, momentum={bn.momentum}, "
                  f"process_groups={self.groups}) on {self.size} ranks, float64, x of shape "
                  f"(n_r, {self.channels})")
            print(f"gamma = {_vec(self.gamma, d)}, beta = {_vec(self.beta, d)}; moving_mean starts at 0, "
                  f"moving_variance at 1")
            print("Channel 0 only, each group's table once" if not self.full else
                  "Every channel, every rank's copy of every buffer")

    def moments(self):
        """1. The forward pass; this rank's local moments, read from the row it sent."""
        d, C, n_r, x, gc = self.digits, self.channels, self.n_r, self.x, self.gc
        self.tap = BufferTap(gc)
        self.y = self.bn(x)                    # the forward pass, with its one Allreduce
        self.width = self.bn._exchange.width   # this layer's part of the group's buffer
        self.sent, self.back = (a[:, :self.width] for a in self.tap.calls[0])
        count = int(self.sent[gc.rank, 1])
        mean_r, m2_r = self.sent[gc.rank, HEADER:].reshape(2, C)
        alone = "" if gc.size > 1 else "  (alone: plain local batch norm, nothing is sent)"
        if self.full:
            self.say(f"{n_r} sample{'s' * (n_r != 1)}, group ranks {self.members}{alone}")
            self.say(f"x = {x.tolist()}" if n_r else f"x is empty, shape (0, {C})")
            self.say(f"n_r = {count}, mean_r = {_vec(mean_r, d)}, m2_r = {_vec(m2_r, d)}")
        else:
            xs = "x[:, 0] = [" + ", ".join(f"{v:g}" for v in x[:, 0]) + "]" if n_r else "x is empty"
            self.say(f"{xs} -> n_r = {count}, mean_r = {mean_r[0]:.{d}g}, "
                     f"m2_r = {m2_r[0]:.{d}g}   (group {self.members}){alone}")
        self.say.step("1. shards and local moments  (functional.batch_norm_stats)",
                      "n_r = values per channel; mean_r = sum(x)/n_r; m2_r = sum((x - mean_r)^2), centred\n"
                      "about the rank's own mean (never a raw sum of squares). An empty shard sends 0, 0, 0.")

    def forward_table(self):
        """2. The rows that came back from the forward Allreduce, the same on the group's ranks."""
        sent, back, gc, members, full = self.sent, self.back, self.gc, self.members, self.full
        names = ("mean", "m2")
        tables = self.comm.allgather(back.tobytes())       # collective: every rank, alone or not
        if gc.size == 1:
            # Alone: no Allreduce happened, so there is no table that "came back".
            self.say("alone: nothing is sent; its own row is the whole table:\n"
                     + _table(sent, members, names, self.digits, full))
        else:
            others_zero = not np.any(np.delete(sent, gc.rank, axis=0))
            # Bitwise as sent, except that a -0.0 comes back as +0.0 (-0.0 + 0.0 = +0.0).
            own_back = np.array_equal(back[gc.rank], sent[gc.rank] + 0.0)
            same = all(tables[r] == tables[self.rank] for r in members)
            if full:
                self.say("sent:\n" + _table(sent, members, names, self.digits, full))
                self.say("came back:\n" + _table(back, members, names, self.digits, full))
            elif self.first:
                self.say(_table(back, members, names, self.digits, full))
            self.show(self.check("only its own row was non-zero in what it sent", others_zero), quiet=True)
            self.show(self.check("its own row came back bitwise unchanged (v + 0 = v)", own_back),
                      quiet=True)
            self.show(self.check(f"bitwise the same table on group ranks {members}", same),
                      quiet=not self.first)
        self.say.step("2. the forward Allreduce(SUM) over the group: every rank's row, bit for bit",
                      f"Buffer (P, {HEADER} + 2C): one row per group rank, [status, count, layer tag, call |\n"
                      "8 details | payload]. Each rank fills only its own row; every column then has at\n"
                      "most one non-zero entry, so the SUM is exact and works as an allgather of the rows\n"
                      "(bit for bit, except that a -0.0 comes back as +0.0).\n"
                      "Shown: the table that came back" + (" on every rank." if full else
                                                           ", once per group (channel 0).")
                      + " A rank alone sends nothing.")

    def statistics(self):
        """3. The group's mean and variance merged from the table, next to the wrong mean of means."""
        d, shown, bn, say = self.digits, self.shown, self.bn, self.say
        counts, rows = self.back[:, 1], self.back[:, HEADER:].reshape(-1, 2, self.channels)
        self.N, self.mean, self.M2 = N, mean, M2 = F.merge_stats(counts, rows[:, 0], rows[:, 1])
        var, self.s = bn.batch_var, F.inv_std_from_var(bn.batch_var, bn.eps)
        m, P = bn.momentum, self.gc.size
        if self.first or self.full:
            terms = " + ".join(f"{int(c)}*{_p(r[0, 0], d)}" for c, r in zip(counts, rows))
            say(f"N = {N}; " + _worked("mean", f"({terms})/{N}", mean, d, shown))
            if P > 1:
                say("   (averaging the ranks' means instead: " + self.mean_of_means(counts, rows) + ")")
            within = rows[:, 1].sum(axis=0)
            say(f"M2 = sum m2_r + sum n_r (mean_r - mean)^2 = {_num(within, d, shown)} + "
                f"{_num(M2 - within, d, shown)} = {_num(M2, d, shown)}")
            say(f"var = M2/N = {_num(var, d, shown)}; s = 1/sqrt(var + eps) = {_num(self.s, d, shown)}")
            if N > 1:
                say(f"moving_mean = {m:g}*0 + {1 - m:g}*mean = {_num(bn.moving_mean.data, d, shown)}; "
                    f"moving_variance = {m:g}*1 + {1 - m:g}*M2/(N-1) = "
                    f"{_num(bn.moving_variance.data, d, shown)}")
        agrees = np.array_equal(mean, bn.batch_mean) and np.array_equal(M2 / N, bn.batch_var)
        self.show(self.check("merge_stats of that table gives bitwise the layer's mean and var", agrees),
                  quiet=not self.first)
        say.step("3. group statistics  (functional.merge_stats, inv_std_from_var, running_update)",
                 "Chan's merge: the rows are combined in rank order on every rank, so the ranks of a\n"
                 "group get the same bits. The moving variance takes the unbiased M2/(N-1), N the group's.")

    def mean_of_means(self, counts, rows):
        """What a scheme that averages the ranks' means would give, for contrast.

        An empty rank has no mean (0/0): its row's 0 is only a placeholder that
        its count 0 masks, so it is left out here and named instead."""
        d, shown = self.digits, self.shown
        full = [i for i, c in enumerate(counts) if c > 0]
        empty = [self.members[i] for i, c in enumerate(counts) if c == 0]
        parts = []
        if len(full) > 1:
            naive = rows[full, 0].mean(axis=0)
            listed = " + ".join(f"{_p(rows[i, 0, 0], d)}" for i in full)
            uneven = len({int(counts[i]) for i in full}) > 1
            parts.append(_worked("mean", f"({listed})/{len(full)}", naive, d, shown)
                         + (": wrong, the counts differ" if uneven else
                            ": right here only because the counts are equal"))
        if empty:
            ranks = ", ".join(str(r) for r in empty)
            parts.append(f"rank{'s' * (len(empty) > 1)} {ranks} hold{'s' * (len(empty) == 1)} no values "
                         "and so no mean: averaging every rank's mean would give 0/0 = NaN")
        return "; ".join(parts)

    def output(self):
        """4. One element of y by hand."""
        d, x, y, mean, s = self.digits, self.x, self.y, self.mean, self.s
        if self.n_r:
            self.say(f"y[0,0] = gamma*(x - mean)*s + beta = {_p(self.gamma[0], d)}*({_p(x[0, 0], d)} - "
                     f"{_p(mean[0], d)})*{_p(s[0], d)} + {_p(self.beta[0], d)} = {y[0, 0]:.{d}g}")
            if self.full:
                self.say(f"y = {_nested(y, d)}")
        else:
            self.say(f"y is empty, shape {y.shape}")
        self.say.step("4. output  (functional.batch_norm_elemt)",
                      "y = gamma * (x - mean) * s + beta, with the group's mean and s.")

    def backward_sums(self):
        """5. The backward pass: the two local sums sent, and the group's sums that came back."""
        d, shown, gc, members, bn, say = self.digits, self.shown, self.gc, self.members, self.bn, self.say
        self.dx = bn.backward(self.dy)
        sent_b, back_b = (a[:, :self.width] for a in self.tap.calls[1])
        self.tap.close()
        # The two local sums are read from the row this rank sent.
        sum_dy, sum_dy_xhat = sent_b[gc.rank, HEADER:].reshape(2, self.channels)
        if self.full and self.n_r:
            say(f"dy = {self.dy.tolist()}")
        say(f"{'sent' if gc.size > 1 else 'local (not sent)'} sum_dy = {_num(sum_dy, d, shown)}, sum_dy_xhat = {_num(sum_dy_xhat, d, shown)}"
            + ("" if self.n_r else "  (empty shard: zeros)"))
        self.show(self.check("they are bitwise this rank's dbeta and dgamma",
                             np.array_equal(sum_dy, bn.beta.grad) and np.array_equal(sum_dy_xhat, bn.gamma.grad)),
                  quiet=True)
        self.g_dy, self.g_dy_xhat = back_b[:, HEADER:].reshape(-1, 2, self.channels).sum(axis=0)
        if self.full:
            say("came back:\n" + _table(back_b, members, ("sum_dy", "sum_dy_xhat"), d, self.full))
        if self.first or self.full:
            say(f"group sums (rows added in rank order): sum_dy = {_num(self.g_dy, d, shown)}, "
                f"sum_dy_xhat = {_num(self.g_dy_xhat, d, shown)}")
        tables_b = self.comm.allgather(back_b.tobytes())
        if gc.size > 1:
            self.show(self.check(f"bitwise the same table on group ranks {members}",
                                 all(tables_b[r] == tables_b[self.rank] for r in members)),
                      quiet=not self.first)
        say.step("5. backward: the two local sums, the second Allreduce  "
                 "(functional.batch_norm_backward_reduce)",
                 "Per channel sum(dy) and sum(dy * xhat) (dy random, never all ones), as the payload\n"
                 "of the same buffer (its count field is left 0: backward reuses forward's N).\n"
                 "They are also this rank's dbeta and dgamma: local shares that the training step\n"
                 "sums over the ranks like every other parameter gradient.")

    def input_gradient(self):
        """6. One element of dx by hand."""
        d, x, dy, mean, s, N = self.digits, self.x, self.dy, self.mean, self.s, self.N
        if self.n_r and (self.first or self.full):
            xhat00 = (x[0, 0] - mean[0]) * s[0]
            self.say("dx[0,0] = gamma*s*(dy - sum_dy/N - xhat*sum_dy_xhat/N)")
            self.say(f"        = {_p(self.gamma[0], d)}*{_p(s[0], d)}*({_p(dy[0, 0], d)} - "
                     f"{_p(self.g_dy[0], d)}/{N} - {_p(xhat00, d)}*{_p(self.g_dy_xhat[0], d)}/{N}) "
                     f"= {self.dx[0, 0]:.{d}g}")
        elif self.full:
            self.say("dx is empty")
        self.say.step("6. input gradient  (functional.batch_norm_backward_elemt)",
                      "dx needs only the group's two sums, N, and what forward kept (x, mean, s).")

    def against_textbook(self):
        """7. y, dx, the statistics and the group's dgamma against textbook batch norm of the
        group's concatenated batch."""
        members, shards, cuts, n_r = self.members, self.shards, self.cuts, self.n_r
        idx = np.concatenate([np.arange(cuts[r], cuts[r + 1]) for r in members]).astype(int)
        y_ref, dx_ref, mean_ref, var_ref, dgamma_ref = textbook.batch_norm(
            self.x_all[idx], self.dy_all[idx], self.gamma, self.beta, self.bn.eps)
        mine = slice(sum(shards[r] for r in members[:self.gc.rank]), None)
        err_y = float(np.abs(self.y - y_ref[mine][:n_r]).max(initial=0.0))
        err_dx = float(np.abs(self.dx - dx_ref[mine][:n_r]).max(initial=0.0))
        err_stats = float(max(np.abs(self.mean - mean_ref).max(), np.abs(self.M2 / self.N - var_ref).max()))
        # Summing the local dgamma over the group gives the concatenated batch's dgamma.
        shares = self.comm.allgather(self.bn.gamma.grad)
        err_dgamma = float(np.abs(sum(shares[r] for r in members) - dgamma_ref).max())
        self.say(f"max abs difference: y {err_y:.1e}, dx {err_dx:.1e}, mean and var {err_stats:.1e}, "
                 f"group's sum of dgamma {err_dgamma:.1e}")
        P = self.gc.size
        self.show(self.check("all within 1e-12, and " + ("2 Allreduce calls" if P > 1 else "no Allreduce (alone)"),
                             max(err_y, err_dx, err_stats, err_dgamma) < 1e-12
                             and self.gc.allreduce_calls == (2 if P > 1 else 0)), quiet=True)
        self.say.step("7. check against plain batch norm of each group's concatenated batch",
                      "Textbook NumPy formulas, independent of mpibn.functional.")

    def summary(self):
        """Rank 0 counts the checks of every rank; the exit status, the same on every rank."""
        from mpi4py import MPI
        results = self.comm.gather(self.check.results, root=0)
        ok = self.comm.allreduce(int(self.check.ok), op=MPI.MIN)
        if self.rank == 0:
            total = sum(len(r) for r in results)
            print(f"\n{total} checks on {self.size} ranks ({'all printed' if self.full else 'failures and group checks printed'}): "
                  + ("all True. One Allreduce forward and one backward in each group of two or more "
                     "ranks (none for a rank alone); every group's result equals its concatenated batch." if ok else "MISMATCH: some check is False"))
        self.bn.close()
        return 0 if ok else 1
