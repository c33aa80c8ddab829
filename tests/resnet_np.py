"""A small NumPy ResNet-style stack for the network tests.

stem:   h = relu(bn0(conv0(x)))
block:  h = relu(h + bn2(conv2(relu(bn1(conv1(h))))))      (x n_blocks)
head:   out = mean_{H,W}(h) @ w_head;  loss = 0.5 * sum((out - target)^2)

Convolutions are 1x1 (a channel matmul), so every gradient is a few lines.
The loss is a *sum* over samples: the loss of the concatenated batch is the
sum of the ranks' losses, and so are all parameter gradients.
"""
import numpy as np

from mpibn import SyncBatchNorm


def conv(x, w):                # (N, Ci, H, W), (Co, Ci) -> (N, Co, H, W)
    return np.einsum("oi,nihw->nohw", w, x)


def conv_backward(x, w, dy):   # -> dx, dw
    # C order explicitly: with N = 0, einsum may return dw in Fortran order,
    # and an Allreduce of differently laid-out buffers sums transposed values.
    return np.einsum("oi,nohw->nihw", w, dy), np.ascontiguousarray(np.einsum("nohw,nihw->oi", dy, x))


class Net:
    def __init__(self, channels, n_blocks, outputs, comm, seed=0, process_groups=None):
        rng = np.random.default_rng(seed)
        self.weights = {"conv0": rng.normal(0, 0.5, (channels, channels))}
        for b in range(n_blocks):
            for j in (1, 2):
                self.weights[f"conv{b}_{j}"] = rng.normal(0, 0.5, (channels, channels))
        self.weights["head"] = rng.normal(0, 0.5, (channels, outputs))
        names = ["bn0"] + [f"bn{b}_{j}" for b in range(n_blocks) for j in (1, 2)]
        self.bns = {n: SyncBatchNorm(channels, gamma_init=rng.normal(1, 0.1, channels),
                                     beta_init=rng.normal(0, 0.1, channels), dtype=np.float64,
                                     comm=comm, process_groups=process_groups).set_train()
                    for n in names}
        self.n_blocks = n_blocks
        self.bn_order = names        # forward call order; tests may permute it on one rank

    def forward(self, x):
        w, bn, t = self.weights, self.bns, {}
        t["x"] = x
        t["a0"] = conv(x, w["conv0"])
        h = np.maximum(bn["bn0"](t["a0"]), 0)
        t["h0"] = h
        for b in range(self.n_blocks):
            t[f"in{b}"] = h
            a1 = conv(h, w[f"conv{b}_1"])
            r1 = np.maximum(bn[f"bn{b}_1"](a1), 0)
            a2 = conv(r1, w[f"conv{b}_2"])
            s = h + bn[f"bn{b}_2"](a2)
            h = np.maximum(s, 0)
            t[f"r1_{b}"], t[f"s{b}"] = r1, s
        t["pool"] = h.mean(axis=(2, 3))
        self.tape = t
        return t["pool"] @ w["head"]

    def backward(self, dout):
        w, bn, t, g = self.weights, self.bns, self.tape, {}
        g["head"] = t["pool"].T @ dout
        dpool = dout @ w["head"].T
        hw = t["x"].shape[2] * t["x"].shape[3]
        dh = np.broadcast_to(dpool[:, :, None, None] / hw, t[f"s{self.n_blocks - 1}"].shape).copy()
        for b in reversed(range(self.n_blocks)):
            ds = dh * (t[f"s{b}"] > 0)
            da2 = bn[f"bn{b}_2"].backward(ds)
            dr1, g[f"conv{b}_2"] = conv_backward(t[f"r1_{b}"], w[f"conv{b}_2"], da2)
            da1 = bn[f"bn{b}_1"].backward(dr1 * (t[f"r1_{b}"] > 0))
            dx1, g[f"conv{b}_1"] = conv_backward(t[f"in{b}"], w[f"conv{b}_1"], da1)
            dh = ds + dx1
        da0 = bn["bn0"].backward(dh * (t["h0"] > 0))
        _, g["conv0"] = conv_backward(t["x"], w["conv0"], da0)
        for name, layer in bn.items():
            g[f"{name}.gamma"], g[f"{name}.beta"] = layer.gamma.grad, layer.beta.grad
        return g

    def sgd(self, grads, lr):
        for name, wv in self.weights.items():
            wv -= lr * grads[name]
        for name, layer in self.bns.items():
            layer.gamma.data -= lr * grads[f"{name}.gamma"]
            layer.beta.data -= lr * grads[f"{name}.beta"]

    def state(self):
        out = {k: v.copy() for k, v in self.weights.items()}
        for name, layer in self.bns.items():
            for p in layer.get_parameters():
                out[f"{name}.{p.name}"] = p.data.copy()
        return out

    def close(self):
        for layer in self.bns.values():
            layer.close()


def loss_and_grad(out, target):
    diff = out - target
    return 0.5 * float((diff ** 2).sum()), diff
