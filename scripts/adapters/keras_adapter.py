#!/usr/bin/env python3
"""Keras on an mpibn golden set: ``BatchNormalization(synchronized=True)`` under ``MirroredStrategy``.

    python scripts/adapters/keras_adapter.py GOLDEN OUT --keras 3      # Keras 3
    python scripts/adapters/keras_adapter.py GOLDEN OUT --keras 2      # tf_keras (Keras 2)
    python -m mpibn verify GOLDEN OUT

``--keras 3`` is Keras 3 (``import keras``, TensorFlow backend), ``--keras 2``
is tf_keras (Keras 2, ``import tf_keras``). Both run on one CPU split into
one logical device per rank (``tf.config.set_logical_device_configuration``),
with ``tf.distribute.MirroredStrategy`` over them: rank r's shard goes to
replica r (``experimental_distribute_values_from_function``, so shards may
differ in size or be empty) and the step runs eagerly with ``strategy.run``.
Every scenario (every group, see below) runs in a fresh subprocess with a
timeout: a second MirroredStrategy in one process can break collectives.

Mapping of MindSpore's conventions (checked in the Keras sources named):
Keras' momentum is the weight of the OLD value, as in MindSpore (no
conversion); the moving variance takes the BIASED batch variance (MindSpore:
unbiased); ``training`` of the call is the scenario's use of batch
statistics. The synchronised statistics are E[x^2] - E[x]^2 of all-reduced
sums, clamped at 0 (Keras 3 ``backend/tensorflow/nn.py:_compute_moments_sync``,
tf_keras ``BatchNormalization._sync_calculate_mean_and_var``), in float32
for float16 and float32 input. float16 runs under the ``mixed_float16``
policy (float32 variables, float16 output), float64 with ``dtype="float64"``.
Gradients: ``tf.GradientTape`` in every replica with that replica's dy as
output gradient; TensorFlow's gradient of ``all_reduce`` is an all-reduce,
so dx is the gradient of the sum of the ranks' losses and dgamma/dbeta each
replica's own share, as in mpibn. batch_mean/batch_var come from the
layer's own moments method called in the same replica step. Moving
statistics are each replica's local copy (tf_keras keeps them
``ON_READ``/``MEAN``: a cross-replica read is the mean of the copies; that
read is recorded in ``OUT/<scenario>/keras_diag_<first rank of the group>.json``).

Keras has no process groups. A scenario with groups is run as one
MirroredStrategy (one subprocess) per group, which is what a Keras user
would have to do; the report marks it "unsupported" and keeps the numbers
(scripts/conformance/notes/keras3.json).

The conformance columns (docs/conformance/keras3.json, tf-keras.json) are
OUT scored by ``scripts/conformance/column.py`` with ``--peer-moving-var
biased --peer-stats-dtype float32``; the commands are in
docs/conformance/keras3.md. A scenario that crashes or hangs writes nothing
(the exit status is then 1 and the message names it).

``--path mask`` and ``--path masking`` run the same numbers through Keras'
mask input paths (``call_layer``): an all-True ``mask=``, and an implicit
mask from a ``Masking`` layer that masks nothing. Both must give the
numbers of the plain call. (Keras 3.15.1 does not: with any mask its
``_moments`` computes local masked moments and never looks at
``self.synchronized``; docs/conformance/reports/keras3-mask-disables-sync.md.)

Needs TensorFlow and keras / tf_keras (the ``keras`` extra: ``pip install
'mpibn[keras]'``, pinned); docs/conformance/keras3.md has the commands.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import load, uses_batch_statistics, write  # noqa: E402


def hide_mpi_env(env):
    return {k: v for k, v in env.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MPI_", "HYDRA_"))}


# ----------------------------------------------------------------------------- worker (one group)

def import_keras(version):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
        if version == "3":
            import keras
        else:
            import tf_keras as keras
    except ImportError as exc:
        sys.exit(f"keras_adapter: {exc} (pip install 'mpibn[keras]': tensorflow, keras and tf_keras, pinned; "
                 f"see docs/conformance/keras3.md)")
    if version == "3" and not keras.__version__.startswith("3"):
        sys.exit(f"keras_adapter: --keras 3 found keras {keras.__version__}")
    return tf, keras


def make_layer(keras, version, s, first, input_shape):
    init = keras.initializers.Constant
    dtype = {"float16": "mixed_float16", "bfloat16": "mixed_bfloat16", "float64": "float64"}.get(
        s["dtype"], "float32")
    bn = keras.layers.BatchNormalization(
        axis=1, momentum=s["momentum"], epsilon=s["eps"], synchronized=True, dtype=dtype,
        gamma_initializer=init(first["gamma"]), beta_initializer=init(first["beta"]),
        moving_mean_initializer=init(first["moving_mean0"]),
        moving_variance_initializer=init(first["moving_var0"]))
    bn.build(input_shape)
    return bn


def batch_moments(tf, bn, version, x, mask=None):
    """The layer's own synchronised moments of x (with the mask the call got), in the dtype the
    layer normalises with."""
    axes = [0] + list(range(2, len(x.shape)))
    if version == "3":
        from keras import ops
        from keras.src import backend
        return bn._moments(ops.cast(x, backend.result_type(x.dtype, "float32")), mask)
    if x.dtype in (tf.float16, tf.bfloat16):
        x = tf.cast(x, tf.float32)
    return bn._moments(tf.cast(x, bn._param_dtype), axes, keep_dims=False)


def call_layer(keras, bn, x, training, path):
    """y, and the mask the layer saw: the input path of ``--path``.

    default: ``bn(x, training=...)``. mask: ``mask=`` an all-True (N, C[, H]) mask (the shape
    Keras' masks have: the input's without its last axis); it masks nothing, so the numbers must
    not change. masking: a ``keras.layers.Masking(mask_value=-999)`` before the layer (no value
    is -999, so it masks nothing either): Keras hands its implicit mask to the layer, as in any
    model with Masking or Embedding(mask_zero=True) upstream."""
    if path == "mask":
        import tensorflow as tf
        mask = tf.ones(tf.shape(x)[:-1], tf.bool)
        return bn(x, training=training, mask=mask), mask
    if path == "masking":
        masked = keras.layers.Masking(mask_value=-999.0)(x)
        mask = getattr(masked, "_keras_mask", None)
        return bn(masked, training=training), mask
    return bn(x, training=training), None


def local(strategy, var, version):
    """Per-replica copies of a layer variable (NumPy)."""
    v = var.value if version == "3" else var     # Keras 3: the backend tf.Variable
    return [np.asarray(t) for t in strategy.experimental_local_results(v)]


def worker(args):
    manifest, data = load(args.golden)
    s = manifest["scenarios"][args.scenario]
    members = [int(r) for r in args.members.split(",")]
    ranks = data[args.scenario]
    tf, keras = import_keras(args.keras)
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * len(members))
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:len(members)]
    strategy = tf.distribute.MirroredStrategy(devices)
    if strategy.num_replicas_in_sync != len(members):
        sys.exit(f"keras_adapter: {strategy.num_replicas_in_sync} replicas for {len(members)} ranks")
    first = ranks[members[0]]
    input_shape = (None,) + first["x"].shape[2:]
    with strategy.scope():
        bn = make_layer(keras, args.keras, s, first, input_shape)
    training = uses_batch_statistics(s)
    xdtype = getattr(tf, s["dtype"])

    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y, mask = call_layer(keras, bn, x, training, args.path)
        dx, dgamma, dbeta = tape.gradient(y, [x, bn.gamma, bn.beta], output_gradients=tf.cast(dy, y.dtype))
        if training:
            mean, var = batch_moments(tf, bn, args.keras, x, mask if args.keras == "3" else None)
        else:
            mean = var = tf.zeros([0])
        return y, dx, dgamma, dbeta, mean, var

    def feed(key, t):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(ranks[members[ctx.replica_id_in_sync_group]][key][t], dtype=xdtype))

    out = {r: {k: [] for k in s["outputs"]} for r in members}
    diag = {"aggregated_minus_local_moving_mean": [], "aggregated_minus_local_moving_var": []}
    for t in range(2):
        res = strategy.run(step, args=(feed("x", t), feed("dy", t)))
        y, dx, dg, db, mean, var = ([np.asarray(v) for v in strategy.experimental_local_results(r)] for r in res)
        mm, mv = local(strategy, bn.moving_mean, args.keras), local(strategy, bn.moving_variance, args.keras)
        read_mm, read_mv = np.asarray(bn.moving_mean.numpy()), np.asarray(bn.moving_variance.numpy())
        diag["aggregated_minus_local_moving_mean"].append(
            [float(np.abs(read_mm.astype(np.float64) - m).max()) for m in mm])
        diag["aggregated_minus_local_moving_var"].append(
            [float(np.abs(read_mv.astype(np.float64) - m).max()) for m in mv])
        for i, r in enumerate(members):
            o = out[r]
            o["y"].append(y[i].astype(s["dtype"]))
            o["dx"].append(dx[i].astype(s["dtype"]))
            o["dgamma"].append(dg[i])
            o["dbeta"].append(db[i])
            if "batch_mean" in o:
                o["batch_mean"].append(mean[i])
                o["batch_var"].append(var[i])
            o["moving_mean"].append(mm[i])
            o["moving_var"].append(mv[i])
    for r, o in out.items():
        write(args.out, args.scenario, r, {k: np.stack(v) for k, v in o.items()})
    with open(os.path.join(args.out, args.scenario, f"keras_diag_{members[0]}.json"), "w") as f:
        json.dump({"members": members, **diag}, f)
    return 0


def diag_note(out, name):
    """A sentence when a cross-replica read of the moving statistics differs from the local copies."""
    worst = 0.0
    for fn in os.listdir(os.path.join(out, name)):
        if fn.startswith("keras_diag_"):
            with open(os.path.join(out, name, fn)) as f:
                d = json.load(f)
            for key in ("aggregated_minus_local_moving_mean", "aggregated_minus_local_moving_var"):
                worst = max([worst] + [v for step in d[key] for v in step])
    if worst > 0:
        return (f"the replicas' local moving statistics differ from the cross-replica (checkpoint) read "
                f"by up to {worst:.3g}")
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("golden")
    parser.add_argument("out")
    parser.add_argument("--keras", choices=["3", "2"], required=True, help="3: keras 3.x; 2: tf_keras")
    parser.add_argument("--scenarios", help="comma-separated subset (default: all of the golden set)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per scenario process")
    parser.add_argument("--path", choices=["default", "mask", "masking"], default="default",
                        help="input path: plain call, mask= all True, or a Masking layer before the layer")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scenario", help=argparse.SUPPRESS)
    parser.add_argument("--members", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    manifest, data = load(args.golden)
    names = args.scenarios.split(",") if args.scenarios else list(manifest["scenarios"])
    unknown = [n for n in names if n not in manifest["scenarios"]]
    if unknown:
        sys.exit(f"keras_adapter: --scenarios {unknown} not in {args.golden}")
    runs = {}
    env = hide_mpi_env(os.environ)
    for name in names:
        s = manifest["scenarios"][name]
        status = {"failed": None}
        for members in sorted({tuple(g) for g in s["groups_of_rank"]}):
            cmd = [sys.executable, os.path.abspath(__file__), args.golden, args.out, "--keras", args.keras,
                   "--worker", "--scenario", name, "--members", ",".join(map(str, members)), "--path", args.path]
            t0 = time.time()
            try:
                run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            except subprocess.TimeoutExpired:
                status["failed"] = f"hung: no result after {args.timeout:.0f} s (ranks {list(members)})"
                break
            if run.returncode != 0:
                tail = [ln for ln in (run.stderr or run.stdout).strip().splitlines() if ln.strip()][-1:]
                if run.returncode == 1 and tail and tail[0].startswith("keras_adapter:"):
                    sys.exit(tail[0])           # the framework is missing: nothing to report
                status["failed"] = (f"crashed (exit {run.returncode}, ranks {list(members)}): "
                                    f"{tail[0] if tail else ''}")[:400]
                break
            print(f"{name} ranks {list(members)}: {time.time() - t0:.1f} s", flush=True)
        if not status["failed"]:
            status["diag"] = diag_note(args.out, name)
        else:
            # A half-written scenario (one group done, the next crashed) must not be scored.
            shutil.rmtree(os.path.join(args.out, name), ignore_errors=True)
            print(f"{name}: {status['failed']}", flush=True)
        runs[name] = status
    failed = [n for n, st in runs.items() if st["failed"]]
    print(f"keras {'3' if args.keras == '3' else '2 (tf_keras)'}: {len(names) - len(failed)} of {len(names)} "
          f"scenarios written to {args.out}" + (f"; failed: {failed}" if failed else ""))
    for name, st in runs.items():
        if st.get("diag"):
            print(f"note: {name}: {st['diag']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
