"""Textbook batch norm of one whole batch, written out independently of ``mpibn.functional``.

The yardstick of the command line: ``demo`` and ``explain`` compare the
synced layer with it in float64, and ``mpibn bench`` times it, in the input
dtype, as the "naive" NumPy version a student would write. Per channel,
over the m values of axes N (and H, W) of x (N, C) or (N, C, H, W)::

    mean = sum(x) / m                  var = sum((x - mean)^2) / m   (biased)
    xhat = (x - mean) / sqrt(var + eps)
    y    = gamma * xhat + beta
    dxhat  = dy * gamma
    dx     = (dxhat - sum(dxhat) / m - xhat * sum(dxhat * xhat) / m) / sqrt(var + eps)
    dgamma = sum(dy * xhat)            dbeta = sum(dy)

Nothing is clever on purpose: no shifted data, no fused passes, every
intermediate kept.
"""
from collections import namedtuple

import numpy as np

# What forward keeps for backward: xhat (x's shape); mean, var (1, C, 1, ...); gamma as broadcast.
Saved = namedtuple("Saved", "xhat mean var gamma eps")


def _axes(ndim):
    """The reduced axes (N, H, W) and the shape that broadcasts a (C,) vector."""
    return (0,) + tuple(range(2, ndim)), (1, -1) + (1,) * (ndim - 2)


def forward(x, gamma, beta, eps=1e-5):
    """(y, Saved) in x's dtype; gamma, beta of shape (C,)."""
    axes, shape = _axes(x.ndim)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    xhat = (x - mean) / np.sqrt(var + eps)
    g = gamma.reshape(shape)
    return g * xhat + beta.reshape(shape), Saved(xhat, mean, var, g, eps)


def backward(dy, saved):
    """(dx, dgamma, dbeta): dx of dy's shape, dgamma and dbeta of shape (C,)."""
    axes, _ = _axes(dy.ndim)
    m = dy.size // dy.shape[1]
    xhat = saved.xhat
    dxhat = dy * saved.gamma
    dx = (dxhat - dxhat.mean(axis=axes, keepdims=True)
          - xhat * (dxhat * xhat).sum(axis=axes, keepdims=True) / m) / np.sqrt(saved.var + saved.eps)
    return dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


def batch_norm(x, dy, gamma, beta, eps):
    """Training forward and backward of the whole batch: (y, dx, mean, var, dgamma), the
    statistics and dgamma of shape (C,)."""
    y, saved = forward(x, gamma, beta, eps)
    dx, dgamma, _ = backward(dy, saved)
    return y, dx, saved.mean.ravel(), saved.var.ravel(), dgamma
