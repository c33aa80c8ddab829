"""``python -m mpibn explain``: follow the numbers through SyncBatchNorm, rank by rank.

A tiny run (C = 2 channels, a handful of samples, 4 ranks, groups
[[0, 1], [2, 3]], uneven shards, rank 3 empty) of the real layer,
``mpibn.SyncBatchNorm``, printed step by step in rank order:

1. each rank's shard x;
2. its local moments (n, mean, m2)            ``functional.batch_norm_stats``;
3. the buffer it hands to MPI_Allreduce: its own row filled, the others 0
   (layout in ``mpibn.comm``);
4. the buffer that came back: every row of the group, bitwise the same on
   every rank of the group;
5. the group's statistics                      ``functional.merge_stats``;
6. one element of y worked out by hand         ``functional.batch_norm_elemt``;
7. backward: the two local sums                ``functional.batch_norm_backward_reduce``,
   the buffer sent and received, and one element of dx
                                               ``functional.batch_norm_backward_elemt``;
8. a check against plain batch norm of each group's concatenated batch.

How the buffer is seen: the group communicator's ``allreduce_sum`` is
wrapped, on this process only, by ``BufferTap``, which copies the buffer
just before and just after the collective. The library is not changed.
The narrative is derived in docs/derivation.md.
"""
import numpy as np

from . import functional as F
from .errors import N_DETAILS

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
        self.lines.extend(str(text).split("\n"))

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


def _rows(a):
    return "[" + ", ".join("[" + ", ".join(f"{v:g}" for v in r) + "]" for r in a) + "]"


def _p(v, digits):
    """A number for a worked formula: negative ones in parentheses."""
    return f"({v:.{digits}g})" if v < 0 else f"{v:.{digits}g}"


def _row(row, channels, k, names, digits):
    head = ", ".join(str(int(v)) for v in row[:4])
    details = ",".join(str(int(v)) for v in row[4:HEADER])
    payload = row[HEADER:].reshape(k, channels)
    parts = " ".join(f"{name}={_vec(p, digits)}" for name, p in zip(names, payload))
    return f"[{head} | {details} | {parts}]"


def _table(buf, ranks, channels, names, digits):
    return "\n".join(f"row {r} (rank {ranks[r]}): {_row(buf[r], channels, 2, names, digits)}"
                     for r in range(buf.shape[0]))


def reference(x, dy, gamma, beta, eps):
    """Textbook batch norm of a whole (N, C) batch in float64, written out
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
    from .comm import validate_process_groups
    from .layer import SyncBatchNorm

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
    digits = args.digits
    C = args.channels
    cuts = np.concatenate([[0], np.cumsum(shards)])
    lo, hi = int(cuts[rank]), int(cuts[rank + 1])
    x_all, dy_all, gamma, beta = make_data(int(cuts[-1]), C, args.seed)
    x, dy = x_all[lo:hi], dy_all[lo:hi]
    names_fwd, names_bwd = ("mean", "m2"), ("sum_dy", "sum_dy_xhat")

    bn = SyncBatchNorm(C, gamma_init=gamma, beta_init=beta, process_groups=groups,
                       dtype=np.float64).set_train()
    gc = bn.group_comm
    members = list(gc.ranks)
    say = Report(comm)

    if rank == 0:
        print(f"SyncBatchNorm(num_features={C}, eps={bn.eps}, momentum={bn.momentum}, "
              f"process_groups={groups}) on {size} ranks, float64, x of shape (n_r, {C})")
        print(f"gamma = {_vec(gamma, digits)}, beta = {_vec(beta, digits)}; "
              f"moving_mean starts at 0, moving_variance at 1")
    say(f"{hi - lo} sample{'s' * (hi - lo != 1)}, group ranks {members}"
        + ("" if gc.size > 1 else "  (alone: plain local batch norm, nothing is sent)"))
    say(f"x = {_rows(x)}" if hi > lo else f"x is empty, shape (0, {C})")
    say.step("1. input shards", "Every rank holds its own slice of the batch; shards are uneven.")

    count, mean_r, m2_r = F.batch_norm_stats(F.as_ncl(x))
    say(f"n = {count}, mean = {_vec(mean_r, digits)}, m2 = {_vec(m2_r, digits)}")
    local_moments = np.ravel([mean_r, m2_r])
    say.step("2. local moments  (functional.batch_norm_stats)",
             "n_r = values per channel; mean_r = sum(x)/n_r; m2_r = sum((x - mean_r)^2), centred\n"
             "about the rank's own mean (never a raw sum of squares). An empty shard gives 0, 0, 0.")

    tap = BufferTap(gc)
    y = bn(x)
    # The group's buffer may be wider than this layer's rows (it is shared by
    # every layer of the group, sized for the widest); show this layer's part.
    width = bn._exchange.width
    sent, back = (a[:, :width] for a in tap.calls[0])
    say(_table(sent, members, C, names_fwd, digits))
    say(f"own row's count and payload are bitwise step 2's n, mean, m2: "
        f"{sent[gc.rank, 1] == count and np.array_equal(sent[gc.rank, HEADER:], local_moments)}")
    say.step("3. forward buffer handed to MPI_Allreduce(SUM) over the group",
             f"Shape (P, {HEADER} + 2C) = {sent.shape}, one row per group rank: "
             "[status, count, layer, call | 8 details | payload].\n"
             "A rank fills only its own row; the other rows are 0. layer and call number this\n"
             "call of this layer: every rank checks, after the Allreduce, that all rows agree.")

    say(_table(back, members, C, names_fwd, digits))
    own_ok = np.array_equal(back[gc.rank], sent[gc.rank])
    say(f"own row came back unchanged (x + 0 = x exactly): {own_ok}; Allreduce calls so far: "
        f"{gc.allreduce_calls}")
    tables = comm.allgather(back.tobytes())
    same = all(tables[r] == tables[rank] for r in members)
    say(f"bitwise the same table on group ranks {members}: {same}")
    say.step("4. what came back: every rank's row, bit for bit",
             "Summing rows in which all but one entry is 0 is exact, so each rank now holds every\n"
             "row exactly, whatever order MPI added them in.")

    counts, rows = back[:, 1], back[:, HEADER:].reshape(-1, 2, C)
    N, mean, M2 = F.merge_stats(counts, rows[:, 0], rows[:, 1])
    inv_std = F.inv_std_from_var(M2 / N, bn.eps)
    m = bn.momentum
    say(f"N = {N}, mean = {_vec(mean, digits)}, M2 = {_vec(M2, digits)}")
    say(f"var = M2/N = {_vec(M2 / N, digits)} (normalises), inv_std = {_vec(inv_std, digits)}")
    if N > 1:
        say(f"M2/(N-1) = {_vec(M2 / (N - 1), digits)} (unbiased, group's N) -> moving_variance = "
            f"{m:g}*1 + {1 - m:g}*that = "
            f"{_vec(bn.moving_variance.data, digits)}")
    say(f"moving_mean = {m:g}*0 + {1 - m:g}*mean = {_vec(bn.moving_mean.data, digits)}")
    say(f"same as the layer's batch_mean/batch_var: "
        f"{np.array_equal(mean, bn.batch_mean) and np.array_equal(M2 / N, bn.batch_var)}")
    say.step("5. group statistics  (functional.merge_stats, inv_std_from_var, running_update)",
             "N = sum n_r;  mean = sum n_r mean_r / N;  M2 = sum m2_r + sum n_r (mean_r - mean)^2.\n"
             "Rows are combined in rank order, so both ranks of a group get the same bits.")

    if hi > lo:
        say(f"y[0] = {_vec(y[0], digits)}")
        d = digits
        say(f"y[0,0] = gamma*(x - mean)*inv_std + beta = {_p(gamma[0], d)}*({_p(x[0, 0], d)} - "
            f"{_p(mean[0], d)})*{_p(inv_std[0], d)} + {_p(beta[0], d)} = {y[0, 0]:.{d}g}")
    else:
        say(f"y is empty, shape {y.shape}")
    say.step("6. output  (functional.batch_norm_elemt)",
             "xhat = (x - mean) * inv_std;  y = gamma * xhat + beta, with the group's mean and inv_std.")

    dx = bn.backward(dy)
    sent_b, back_b = (a[:, :width] for a in tap.calls[1])
    tap.close()
    xhat = (x - mean) * inv_std
    sum_dy, sum_dy_xhat = F.batch_norm_backward_reduce(F.as_ncl(dy), F.as_ncl(xhat))
    if hi > lo:
        say(f"dy = {_rows(dy)}")
    same_b = np.array_equal(sent_b[gc.rank, HEADER:], np.ravel([sum_dy, sum_dy_xhat]))
    say(f"sum_dy = {_vec(sum_dy, digits)}, sum_dy_xhat = {_vec(sum_dy_xhat, digits)}  "
        f"(bitwise the payload of the row sent: {same_b})")
    say(_table(sent_b, members, C, names_bwd, digits))
    say.step("7. backward: local sums and the buffer sent  (functional.batch_norm_backward_reduce)",
             "Upstream gradient dy (random, never all ones); per channel sum(dy) and sum(dy * xhat).\n"
             "Same buffer, same layout; count 0; the tag's layer number + 1 marks the backward pass.")

    g_dy, g_dy_xhat = back_b[:, HEADER:].reshape(-1, 2, C).sum(axis=0)
    say(_table(back_b, members, C, names_bwd, digits))
    say(f"group sums (rows added in rank order): sum_dy = {_vec(g_dy, digits)}, "
        f"sum_dy_xhat = {_vec(g_dy_xhat, digits)}")
    if hi > lo:
        d = digits
        say("dx[0,0] = gamma*inv_std*(dy - sum_dy/N - xhat*sum_dy_xhat/N)")
        say(f"        = {_p(gamma[0], d)}*{_p(inv_std[0], d)}*({_p(dy[0, 0], d)} - {_p(g_dy[0], d)}/{N}"
            f" - {_p(xhat[0, 0], d)}*{_p(g_dy_xhat[0], d)}/{N}) = {dx[0, 0]:.{d}g}")
    say(f"dgamma = this rank's sum_dy_xhat = {_vec(bn.gamma.grad, digits)}, "
        f"dbeta = this rank's sum_dy = {_vec(bn.beta.grad, digits)}  (local shares)")
    say.step("8. backward: what came back, and dx  (functional.batch_norm_backward_elemt)",
             "dx needs only the group's two sums and N. dgamma/dbeta stay local: data parallelism\n"
             "sums them over ranks later, like every other parameter's gradient.")

    # Independent check: textbook batch norm of each group's concatenated batch.
    idx = np.concatenate([np.arange(cuts[r], cuts[r + 1]) for r in members]).astype(int)
    y_ref, dx_ref, mean_ref, var_ref = reference(x_all[idx], dy_all[idx], gamma, beta, bn.eps)
    mine = slice(sum(shards[r] for r in members[:gc.rank]), None)
    err_y = float(np.abs(y - y_ref[mine][:hi - lo]).max(initial=0.0))
    err_dx = float(np.abs(dx - dx_ref[mine][:hi - lo]).max(initial=0.0))
    err_stats = float(max(np.abs(mean - mean_ref).max(), np.abs(M2 / N - var_ref).max()))
    # Summing the local dgamma over the group gives the concatenated batch's dgamma.
    shares = comm.allgather(bn.gamma.grad)
    dgamma_ref = (dy_all[idx] * (x_all[idx] - mean_ref) / np.sqrt(var_ref + bn.eps)).sum(axis=0)
    err_dgamma = float(np.abs(sum(shares[r] for r in members) - dgamma_ref).max())
    say(f"max |y - y_concat| = {err_y:.1e}, max |dx - dx_concat| = {err_dx:.1e}, "
        f"max |mean, var - concat| = {err_stats:.1e}")
    say(f"max |sum of the group's dgamma - dgamma_concat| = {err_dgamma:.1e}; "
        f"Allreduce calls: {gc.allreduce_calls}")
    say.step("9. check against plain batch norm of each group's concatenated batch",
             "Computed here with textbook NumPy formulas, independently of mpibn.functional.")
    ok = comm.allreduce(int(max(err_y, err_dx, err_stats, err_dgamma) < 1e-12), op=MPI.MIN)
    if rank == 0:
        print("\none Allreduce forward, one backward; every group's result equals its "
              "concatenated batch" if ok else "\nMISMATCH with the concatenated batch")
    bn.close()
    return 0 if ok else 1
