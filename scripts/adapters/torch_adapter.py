#!/usr/bin/env python3
"""PyTorch (CPU) on an mpibn golden set: ``torch.nn.functional.batch_norm`` on each group's batch.

    python scripts/adapters/torch_adapter.py GOLDEN OUT
    python -m mpibn verify GOLDEN OUT

Synchronised batch norm over a group equals plain batch norm of the group's
concatenated batch, so on one CPU process we run ``F.batch_norm`` on that
batch (training when the scenario uses batch statistics), with
``momentum = 1 - MindSpore's momentum`` (torch 0.1 == MindSpore 0.9) and the
scenario's eps. Per rank: y and dx are that rank's rows; dgamma and dbeta
are the rank's share, obtained by back-propagating dy masked to the rank's
rows; batch_mean/batch_var come from ``torch.var_mean(correction=0)``.
Parameters and moving statistics are float64 for float64 input and float32
otherwise (torch's CPU kernel takes float32 parameters with float16 and bfloat16 input). ``torch.nn.SyncBatchNorm`` itself needs
CUDA devices; where a GPU exists it can be checked the same way.

Needs torch (the ``torch`` extra: ``pip install 'mpibn[torch]'``, pinned to
the CPU build 2.13.0).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import concat, groups, load, uses_batch_statistics, write  # noqa: E402


def as_numpy(t):
    """NumPy has no torch.bfloat16: such a tensor comes back as float32 (exact), as golden stores it."""
    return (t.float() if str(t.dtype) == "torch.bfloat16" else t).numpy()


def run_group(torch, ranks, members, s):
    F = torch.nn.functional
    first = ranks[members[0]]
    tdtype = getattr(torch, s["dtype"])
    pdtype = torch.float64 if s["dtype"] == "float64" else torch.float32
    weight = torch.tensor(first["gamma"], dtype=pdtype, requires_grad=True)
    bias = torch.tensor(first["beta"], dtype=pdtype, requires_grad=True)
    running_mean = torch.tensor(first["moving_mean0"], dtype=pdtype)
    running_var = torch.tensor(first["moving_var0"], dtype=pdtype)
    training = uses_batch_statistics(s)
    out = {r: {k: [] for k in s["outputs"]} for r in members}
    for step in range(2):
        x_np, slices = concat(ranks, members, "x", step)
        dy_np, _ = concat(ranks, members, "dy", step)
        x = torch.tensor(x_np, dtype=tdtype, requires_grad=True)
        dy = torch.tensor(dy_np, dtype=tdtype)
        y = F.batch_norm(x, running_mean, running_var, weight, bias, training=training,
                         momentum=1.0 - s["momentum"], eps=s["eps"])
        (dx,) = torch.autograd.grad(y, x, dy, retain_graph=True)
        dims = [0] + list(range(2, x.dim()))
        if training:
            var, mean = torch.var_mean(x.detach(), dim=dims, correction=0)
        for r in members:
            mask = torch.zeros_like(dy)
            mask[slices[r]] = dy[slices[r]]
            dgamma, dbeta = torch.autograd.grad(y, [weight, bias], mask, retain_graph=True)
            o = out[r]
            o["y"].append(as_numpy(y.detach()[slices[r]]))
            o["dx"].append(as_numpy(dx[slices[r]]))
            o["dgamma"].append(as_numpy(dgamma))
            o["dbeta"].append(as_numpy(dbeta))
            if "batch_mean" in o:
                o["batch_mean"].append(as_numpy(mean))
                o["batch_var"].append(as_numpy(var))
            o["moving_mean"].append(running_mean.clone().numpy())
            o["moving_var"].append(running_var.clone().numpy())
    return {r: {k: np.stack(v) for k, v in o.items()} for r, o in out.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("golden")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit("torch_adapter: torch is not installed (pip install 'mpibn[torch]')")
    torch.use_deterministic_algorithms(True)
    manifest, data = load(args.golden)
    for name, s in manifest["scenarios"].items():
        for members in groups(s):
            for r, arrays in run_group(torch, data[name], members, s).items():
                write(args.out, name, r, arrays)
    print(f"torch {torch.__version__} (CPU, F.batch_norm on each group's batch): "
          f"{len(manifest['scenarios'])} scenarios written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
