#!/usr/bin/env python3
"""Draw docs/dataflow.png: how SyncBatchNorm's data flows, forward and backward.

    python scripts/make_figure.py [--out docs/dataflow.png]

Needs matplotlib (``pip install 'mpibn[docs]'``). The picture follows the
``python -m mpibn explain`` example: 4 ranks, groups [[0, 1], [2, 3]],
shards of 3, 1, 2 and 0 samples. Top: the forward pass (local moments ->
each rank's row in the stacked buffer -> one SUM Allreduce per group ->
every row on every rank -> group statistics -> y). Bottom: the backward
pass, which reuses the same buffer for the two per-channel sums.
"""
import argparse
import os

try:
    import matplotlib
except ImportError:
    raise SystemExit("make_figure.py needs matplotlib: pip install 'mpibn[docs]'") from None
matplotlib.use("Agg")
import matplotlib.pyplot as plt                                  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
GROUP_TINTS = ("#e8f0fa", "#eaf6e8")
SHARDS = (3, 1, 2, 0)
GROUPS = ((0, 1), (2, 3))
ROW_Y = {0: 53.0, 1: 46.0, 2: 35.0, 3: 28.0}        # centre line of each rank's lane
FUNC = dict(family="monospace", fontsize=7.6, color="#444444")


def box(ax, x, y, w, h, text, face="white", edge="#555555", size=8.5, weight="normal", **kw):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.25,rounding_size=0.8",
                                fc=face, ec=edge, lw=1.0, zorder=3))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size,
            weight=weight, zorder=4, **kw)


def arrow(ax, x0, y0, x1, y1, colour="#555555", lw=1.1, style="-|>", rad=0.0, z=2):
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle=style, mutation_scale=10,
                                 color=colour, lw=lw, zorder=z,
                                 connectionstyle=f"arc3,rad={rad}"))


def buffer(ax, x, y, rows_filled, group, cell=1.15, height=1.7):
    """A (2, 6) picture of the stacked buffer: [status count tag | a a b b] per row.

    A row is coloured where its rank wrote non-zero values: the header of
    every row it fills, and the payload only when its shard has samples (an
    empty shard's moments are zeros, drawn as "0" like the other ranks' rows)."""
    for i, rank in enumerate(group):
        top = y + height * (len(group) - 1 - i)
        for j in range(6):
            filled = rank in rows_filled and (j < 2 or SHARDS[rank] > 0)
            face = RANK_COLOURS[rank] if filled else "white"
            alpha = (0.35 if j < 2 else 0.8) if filled else 1.0
            ax.add_patch(Rectangle((x + j * cell + (0.35 if j >= 2 else 0), top), cell, height,
                                   fc=face, alpha=alpha, ec="#333333", lw=0.6, zorder=3))
            if not filled:
                ax.text(x + j * cell + cell / 2 + (0.35 if j >= 2 else 0), top + height / 2, "0",
                        ha="center", va="center", fontsize=6.5, color="#999999", zorder=4)
    return x + 6 * cell + 0.35


def forward(ax):
    ax.text(1, 60.3, "Forward: one Allreduce", fontsize=12, weight="bold", va="center")
    for g, group in enumerate(GROUPS):
        lo, hi = ROW_Y[group[-1]] - 4.2, ROW_Y[group[0]] + 4.2
        ax.add_patch(FancyBboxPatch((0.5, lo), 99, hi - lo, boxstyle="round,pad=0,rounding_size=1.2",
                                    fc=GROUP_TINTS[g], ec="none", zorder=0))
        ax.text(1.6, (lo + hi) / 2, f"group {list(group)}", ha="center", va="center",
                fontsize=8.5, style="italic", color="#555555", rotation=90)

    heads = [(8.7, "each rank's shard x"), (24.5, "local moments"), (43.5, "row it sends"),
             (56.8, "MPI"), (69.5, "what comes back"), (83, "group statistics"), (95, "output")]
    for x, text in heads:
        ax.text(x, 58.2, text, ha="center", fontsize=8.8, weight="bold", color="#333333")

    for rank, y in ROW_Y.items():
        colour = RANK_COLOURS[rank]
        group = next(g for g in GROUPS if rank in g)
        # shard: one small square per sample
        box(ax, 3.2, y - 2.6, 11.0, 5.2, "", edge=colour)
        ax.text(3.9, y + 1.3, f"rank {rank}", fontsize=9, weight="bold", color=colour, va="center",
                zorder=5)
        ax.text(3.9, y - 1.3, f"{SHARDS[rank]} sample{'s' * (SHARDS[rank] != 1)}", fontsize=8,
                va="center", zorder=5)
        for s in range(SHARDS[rank]):
            ax.add_patch(Rectangle((9.0 + s * 1.6, y - 0.7), 1.3, 1.4, fc=colour, alpha=0.8,
                                   ec="none", zorder=5))
        if SHARDS[rank] == 0:
            ax.text(10.8, y, "(empty)", fontsize=7.5, color="#777777", va="center", zorder=5)
        arrow(ax, 14.5, y, 17.6, y)
        box(ax, 17.9, y - 2.3, 13.2, 4.6,
            "$n_r,\\ \\mathrm{mean}_r,\\ m2_r$" if SHARDS[rank] else "$n_r = 0$: zeros")
        arrow(ax, 31.4, y, 37.4, y)
        # the buffer this rank hands to MPI: only its own row filled
        buffer(ax, 37.6, y - 1.7, {rank}, group)
        # after the Allreduce: every row of the group on every rank
        end = buffer(ax, 63.0, y - 1.7, set(group), group)
        arrow(ax, end + 0.3, y, 77.6, y)
        box(ax, 77.9, y - 2.3, 10.4, 4.6, "$N,\\ \\mu,\\ \\sigma^2$\nsame bits", size=8.2)
        arrow(ax, 88.6, y, 90.6, y)
        box(ax, 90.9, y - 2.3, 8.0, 4.6,
            "$y = \\gamma\\hat x + \\beta$" if SHARDS[rank] else "y empty", size=8.2)

    for g, group in enumerate(GROUPS):
        top, bottom = ROW_Y[group[0]] + 2.6, ROW_Y[group[-1]] - 2.6
        mid = (top + bottom) / 2
        ax.add_patch(FancyBboxPatch((53.6, bottom), 6.4, top - bottom,
                                    boxstyle="round,pad=0.2,rounding_size=0.8",
                                    fc="#fff6d5", ec="#b8860b", lw=1.3, zorder=3))
        ax.text(56.8, mid, "Allreduce\nSUM\nin place", ha="center", va="center", fontsize=8.2,
                weight="bold", color="#7a5a00", zorder=4)
        for rank in group:
            arrow(ax, 45.6, ROW_Y[rank], 53.4, mid + (ROW_Y[rank] - mid) * 0.5, colour="#b8860b")
            arrow(ax, 60.2, mid + (ROW_Y[rank] - mid) * 0.5, 62.8, ROW_Y[rank], colour="#b8860b")

    # the functions that compute each step
    ax.text(24.5, 23.2, "batch_norm_stats", ha="center", **FUNC)
    ax.text(43.5, 23.2, "RowExchange (comm.py)", ha="center", **FUNC)
    ax.text(69.5, 23.2, "x + 0 = x: rows exact", ha="center", **FUNC)
    ax.text(83, 23.2, "merge_stats", ha="center", **FUNC)
    ax.text(95, 23.2, "batch_norm_elemt", ha="center", **FUNC)
    ax.text(43.5, 21.2, "row r = [status, count, layer, call | details (pale) | payload: "
            "mean, m2 per channel]", ha="center", fontsize=7.3, color="#555555")
    ax.text(83, 21.2, "rows merged in rank order", ha="center", fontsize=7.3, color="#555555")


def backward(ax):
    y = 9.0
    ax.add_patch(FancyBboxPatch((0.5, 1.2), 99, 16.0, boxstyle="round,pad=0,rounding_size=1.2",
                                fc="#f6f0fa", ec="none", zorder=0))
    ax.text(1, 19.0, "Backward: one Allreduce, the same buffer "
            "(every rank, per group; read right to left)", fontsize=12, weight="bold", va="center")
    steps = [
        (90.0, 9.2, "$dy$ from\nthe next layer", None),
        (71.0, 15.0, "local sums\n$\\sum dy,\\ \\sum dy\\,\\hat x$", "batch_norm_backward_reduce"),
        (53.6, 12.0, "Allreduce SUM\nrow per rank", "RowExchange (comm.py)"),
        (34.0, 15.0, "group sums\n(rows added in rank order)", None),
        (4.0, 24.0, "$dx = \\gamma\\, s\\,(dy - \\frac{\\sum dy}{N}"
                    " - \\hat x\\,\\frac{\\sum dy\\,\\hat x}{N})$"
                    "\n$s = 1/\\sqrt{\\sigma^2 + \\epsilon}$", "batch_norm_backward_elemt"),
    ]
    for i, (x, w, text, func) in enumerate(steps):
        face = "#fff6d5" if "Allreduce" in text else "white"
        edge = "#b8860b" if "Allreduce" in text else "#555555"
        box(ax, x, y - 2.6, w, 5.2, text, face=face, edge=edge, size=8.6)
        if func:
            ax.text(x + w / 2, y - 4.9, func, ha="center", **FUNC)
        if i:
            prev = steps[i - 1][0]
            arrow(ax, prev - 0.4, y, x + w + 0.4, y, colour="#7b4f9e", lw=1.4)
    ax.text(71.0 + 7.5, y + 4.9, "also this rank's $d\\gamma,\\ d\\beta$ (local shares)",
            ha="center", fontsize=7.6, color="#7b4f9e")
    ax.text(50, -0.3, "Nothing is communicated when the moving statistics are used. Counts travel "
            "in the buffer, so uneven and empty shards combine exactly; nobody divides by the number "
            "of ranks.",
            ha="center", fontsize=8.3, color="#333333")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "dataflow.png"),
                        help="output file (.png or .svg; default docs/dataflow.png)")
    args = parser.parse_args()
    fig = plt.figure(figsize=(15, 8.4))
    ax = fig.add_axes((0.005, 0.005, 0.99, 0.99))
    ax.set_xlim(0, 100)
    ax.set_ylim(-1.5, 62)
    ax.axis("off")
    forward(ax)
    backward(ax)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
