#!/bin/sh
# Remake docs/conformance/{mpibn-default,mpibn-exact,torch-cpu,flax-fast,flax-twopass,haiku,equinox,nnx}.json,
# the input-path rows docs/conformance/paths/*.json, and docs/conformance.md. Run from the checkout; W is a scratch directory. Frameworks live in their own
# venvs (never in the project's):
#   python3 -m venv /work/venvs/torch && /work/venvs/torch/bin/pip install torch==2.13.0 numpy
#   python3 -m venv /work/venvs/jax && /work/venvs/jax/bin/pip install -e '.[haiku,equinox,nnx]' ml_dtypes
#   (jax 0.10.2, flax 0.12.8, dm-haiku 0.0.17, equinox 0.13.8: the extras pin them)
#   Keras 3, tf_keras, ChainerMN, MindSpore CPU: the install commands are in docs/conformance/<column>.md;
#   each of those columns is remade only when its interpreter (TF_PY, CHAINER_PY, MS_PY) exists.
# PY runs mpibn (the project venv, with mpi4py + MPICH); the adapters need only NumPy + the framework.
set -eu
W=${W:-/tmp/mpibn-conformance}
PY=${PY:-.venv/bin/python}
TORCH_PY=${TORCH_PY:-/work/venvs/torch/bin/python}
JAX_PY=${JAX_PY:-/work/venvs/jax/bin/python}
TF_PY=${TF_PY:-/work/venvs/tf/bin/python}
CHAINER_PY=${CHAINER_PY:-/work/venvs/chainer/bin/python}
MS_PY=${MS_PY:-/work/venvs/ms/bin/python}
D=docs/conformance
mkdir -p "$W" "$D"
if [ "${SKIP_RUN:-0}" != 1 ]; then     # SKIP_RUN=1: score the results already in $W again
$PY -m mpibn golden --out "$W/golden"                          # exact statistics: the reference
$PY -m mpibn golden --out "$W/mpibn-default" --no-exact        # mpibn's default mode, mpiexec -n 4
$PY scripts/adapters/mpibn_testing_adapter.py "$W/golden" "$W/mpibn-exact"   # in-process, no MPI
$TORCH_PY scripts/adapters/torch_adapter.py "$W/golden" "$W/torch-cpu"
$JAX_PY scripts/adapters/jax_adapter.py "$W/golden" "$W/flax-fast"
$JAX_PY scripts/adapters/jax_adapter.py "$W/golden" "$W/flax-twopass" --exact-variance
$JAX_PY scripts/adapters/haiku_adapter.py "$W/golden" "$W/haiku"
$JAX_PY scripts/adapters/equinox_adapter.py "$W/golden" "$W/equinox"
$JAX_PY scripts/adapters/nnx_adapter.py "$W/golden" "$W/nnx"
# input paths (a few scenarios each): the same numbers through another way in
$JAX_PY scripts/adapters/nnx_adapter.py "$W/golden" "$W/nnx@nomask" --path nomask --scenarios even,groups_even
$JAX_PY scripts/adapters/nnx_adapter.py "$W/golden" "$W/nnx@call" --path call --scenarios even,eval,eval_batch_statistics
fi

NP=$($PY -c 'import numpy; print(numpy.__version__)')
MPI4PY=$($PY -c 'import mpi4py; print(mpi4py.__version__)')
TORCH=$($TORCH_PY -c 'import torch; print(torch.__version__)')
JAXV=$($JAX_PY -c 'import jax, flax; print(jax.__version__, flax.__version__)')
HKV=$($JAX_PY -c 'import haiku; print(haiku.__version__)')
EQXV=$($JAX_PY -c 'import equinox; print(equinox.__version__)')
COL="$PY scripts/conformance/column.py $W/golden"
$COL "$W/mpibn-default" --column mpibn-default --out $D/mpibn-default.json --notes scripts/conformance/notes/mpibn-default.json \
  --framework "mpibn SyncBatchNorm, default mode (exact=False), under mpiexec -n 4" \
  --convention "MindSpore: momentum = weight of the old value, unbiased moving variance, statistics of the group's concatenated batch" \
  --versions numpy=$NP mpi4py=$MPI4PY mpich=5.0.2 \
  --command "python -m mpibn golden --out golden --no-exact   # scripts/conformance/make.sh"
$COL "$W/mpibn-exact" --column mpibn-exact --out $D/mpibn-exact.json \
  --framework "mpibn.testing.reference(exact=True): SyncBatchNorm's exact mode, simulated ranks in one process" \
  --convention "MindSpore (as mpibn default); mean and variance correctly rounded" \
  --versions numpy=$NP \
  --command "python scripts/adapters/mpibn_testing_adapter.py golden mpibn-exact   # scripts/conformance/make.sh"
$COL "$W/torch-cpu" --column torch-cpu --out $D/torch-cpu.json --notes scripts/conformance/notes/torch-cpu.json --peer-stats-dtype float32 \
  --framework "torch.nn.functional.batch_norm (CPU) on each group's concatenated batch" \
  --convention "momentum = weight of the NEW value (adapter passes 1 - m); unbiased running variance; statistics and parameters in float32" \
  --versions torch=$TORCH numpy=$NP \
  --command "python scripts/adapters/torch_adapter.py golden torch-cpu   # scripts/conformance/make.sh"
$COL "$W/flax-fast" --column flax-fast --out $D/flax-fast.json --notes scripts/conformance/notes/flax-fast.json --peer-weights device --peer-moving-var biased --peer-stats-dtype float32 \
  --framework "flax.linen.BatchNorm(axis_name=..., axis_index_groups=..., use_fast_variance=True) under jax.pmap, 4 host devices" \
  --convention "momentum = weight of the old value; BIASED moving variance; statistics = pmean of per-device statistics (mask-aware per device)" \
  --versions jax="${JAXV% *}" flax="${JAXV#* }" numpy=$NP \
  --command "python scripts/adapters/jax_adapter.py golden flax-fast   # scripts/conformance/make.sh"
$COL "$W/flax-twopass" --column flax-twopass --out $D/flax-twopass.json --notes scripts/conformance/notes/flax-twopass.json --peer-weights device --peer-moving-var biased --peer-stats-dtype float32 \
  --framework "flax.linen.BatchNorm(..., use_fast_variance=False) under jax.pmap, 4 host devices" \
  --convention "as Flax (fast): weight of old, biased moving variance, pmean of per-device statistics" \
  --versions jax="${JAXV% *}" flax="${JAXV#* }" numpy=$NP \
  --command "python scripts/adapters/jax_adapter.py golden flax-twopass --exact-variance   # scripts/conformance/make.sh"
JAXCOL="--peer-weights device --peer-moving-var biased --peer-stats-dtype float32"
$COL "$W/haiku" --column haiku --out $D/haiku.json --notes scripts/conformance/notes/haiku.json $JAXCOL \
  --framework "haiku.BatchNorm(cross_replica_axis=..., cross_replica_axis_index_groups=..., data_format=channels_first) under jax.pmap, 4 host devices" \
  --convention "decay_rate = weight of the old value; BIASED moving variance (zero-debiased EMA, started at the golden values); statistics = pmean of per-device mean and mean of squares, var = E[x^2] - E[x]^2 in the input dtype; no mask (equal shards only)" \
  --versions jax="${JAXV% *}" dm-haiku=$HKV numpy=$NP \
  --command "python scripts/adapters/haiku_adapter.py golden haiku   # scripts/conformance/make.sh"
$COL "$W/equinox" --column equinox --out $D/equinox.json --notes scripts/conformance/notes/equinox.json $JAXCOL \
  --framework "equinox.nn.BatchNorm(axis_name=(ranks, batch), mode=batch) under vmap inside jax.pmap, 4 host devices" \
  --convention "momentum = weight of the old value; BIASED moving variance; statistics = pmean of per-example means, then of centred squares (two passes); no mask, no groups (equal shards, one group only)" \
  --versions jax="${JAXV% *}" equinox=$EQXV numpy=$NP \
  --command "python scripts/adapters/equinox_adapter.py golden equinox   # scripts/conformance/make.sh"
$COL "$W/nnx" --column nnx --out $D/nnx.json --notes scripts/conformance/notes/nnx.json $JAXCOL \
  --framework "flax.nnx.BatchNorm(axis_name=..., axis_index_groups=..., use_fast_variance=True) under jax.pmap, 4 host devices, padding masked with mask=" \
  --convention "as Flax linen (the same _compute_stats): weight of old, BIASED moving variance, pmean of per-device statistics, fast variance by default (documented)" \
  --versions jax="${JAXV% *}" flax="${JAXV#* }" numpy=$NP \
  --command "python scripts/adapters/nnx_adapter.py golden nnx   # scripts/conformance/make.sh"
P=$D/paths
mkdir -p $P
path_row() {   # RESULTS NAME SHORT PATH FINDING [column.py peer knobs...]
  R=$1; N=$2; S=$3; PA=$4; F=$5; shift 5
  $COL "$W/$R" --column "$N" --out "$P/$N.json" "$@" --framework "$S, path: $PA" --convention "as the column" \
    --framework-short "$S" --path "$PA" --finding "$F" --command "scripts/conformance/make.sh ($R)"
}
path_row "nnx@nomask" nnx-nomask "Flax NNX" "no mask argument" "the same grades as with mask= on equal shards (y within float32 rounding of the masked call)" $JAXCOL
path_row "nnx@call" nnx-call "Flax NNX" "use_running_average at call time" "the same numbers as the constructor flag" $JAXCOL
# The optional peers. Keras goes through column.py like the columns above; the ChainerMN and
# MindSpore adapters score themselves (ChainerMN's gradient share and local-count moving
# variance are conventions column.py's peer reference does not model).
if [ -x "$TF_PY" ]; then
  TFV=$($TF_PY -c 'import tensorflow as tf, keras, tf_keras; print(tf.__version__, keras.__version__, tf_keras.__version__)')
  for K in 3 2; do
    if [ $K = 3 ]; then C=keras3; F="Keras 3 BatchNormalization(axis=1, synchronized=True)"; else C=tf-keras; F="tf_keras (Keras 2) BatchNormalization(axis=1, synchronized=True)"; fi
    [ "${SKIP_RUN:-0}" = 1 ] || $TF_PY scripts/adapters/keras_adapter.py "$W/golden" "$W/$C" --keras $K
    $COL "$W/$C" --column $C --out $D/$C.json --notes scripts/conformance/notes/$C.json --peer-moving-var biased --peer-stats-dtype float32 \
      --framework "$F, TensorFlow backend, under tf.distribute.MirroredStrategy over 4 logical CPU devices" \
      --convention "momentum = weight of the old value (same); BIASED moving variance; statistics from all-reduced sums, variance max(E[x^2] - E[x]^2, 0) in float32 (float64 for float64)" \
      --versions tensorflow=$(echo $TFV | cut -d' ' -f1) keras=$(echo $TFV | cut -d' ' -f2) tf_keras=$(echo $TFV | cut -d' ' -f3) numpy=$NP \
      --command "$TF_PY scripts/adapters/keras_adapter.py golden $C --keras $K   # scripts/conformance/make.sh"
    for PA in mask masking; do
      [ "${SKIP_RUN:-0}" = 1 ] || $TF_PY scripts/adapters/keras_adapter.py "$W/golden" "$W/$C@$PA" --keras $K --path $PA --scenarios even,uneven
      if [ $K = 3 ]; then FI="synchronisation silently off: each replica normalises with its own statistics ([reports/keras3-mask-disables-sync.md](conformance/reports/keras3-mask-disables-sync.md))"; else FI="synchronised with the mask, as without it"; fi
      [ $PA = mask ] && PN="mask= (all True)" || PN="Masking layer before (masks nothing)"
      path_row "$C@$PA" "$C-$PA" "$([ $K = 3 ] && echo 'Keras 3' || echo tf_keras)" "$PN" "$FI" --peer-moving-var biased --peer-stats-dtype float32
    done
  done
fi
# ChainerMN and MindSpore have no bfloat16: those scenarios are left out of their runs.
NOBF=$($PY -c 'import json,sys; m=json.load(open(sys.argv[1])); print(",".join(n for n, s in m["scenarios"].items() if s["dtype"] != "bfloat16"))' "$W/golden/manifest.json")
if [ -x "$CHAINER_PY" ]; then
  [ "${SKIP_RUN:-0}" = 1 ] && J=--json-only || J=
  $CHAINER_PY scripts/adapters/chainermn_adapter.py "$W/golden" "$W/chainermn" --scenarios "$NOBF" --json $D/chainermn.json $J
fi
if [ -x "$MS_PY" ]; then
  [ "${SKIP_RUN:-0}" = 1 ] && J=--json-only || J=--syncbn-probe
  $MS_PY scripts/adapters/mindspore_adapter.py "$W/golden" "$W/mindspore" --scenarios "$NOBF" --json $D/mindspore-cpu.json $J
fi
$PY scripts/conformance/report.py
