#!/usr/bin/env bash
# GPU check: run studies on a GPU machine that has JAX but no TensorFlow, under
# KERAS_BACKEND=jax, once per precision, and print per-trial times read back from MLflow.
#
# The machine has no registry access, so what it lacks travels as wheels in .whl/ (git-ignored):
# keras, optuna, mlflow-skinny (its SQLite store is enough), their pure-Python needs, and
# searchlab itself (`pip wheel --no-deps . -w .whl`), plus .whl/data/ with the datasets and
# .whl/studies/ with the study files. See docs/gpus.md.
#
# Usage, on the device, from the repository root:
#   bash .whl/gpu_check.sh "studies/mnist_dense.py --trials 4 --epochs 3" ["OTHER_STUDY ARGS" ...]
# Each argument is a study file (relative to .whl/) and its `searchlab run` flags; the same
# study may come twice with different flags (e.g. its cache on and off): each runs fresh.
# Rows are labelled ARGUMENT_INDEX:BACKEND-PRECISION.
# Environment: PRECISIONS (default "float32 mixed_float16 mixed_bfloat16"), KERAS_BACKEND
# (default jax), WHL (default .whl), SITE (default /tmp/site).
set -euo pipefail
WHL="$(cd "${WHL:-.whl}" && pwd)"
SITE="${SITE:-/tmp/site}"
PRECISIONS="${PRECISIONS:-float32 mixed_float16 mixed_bfloat16}"
export KERAS_BACKEND="${KERAS_BACKEND:-jax}"
export SEARCHLAB_DATA_DIR="${SEARCHLAB_DATA_DIR:-$WHL/data}"
export PYTHONUNBUFFERED=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false GIT_PYTHON_REFRESH=quiet

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" "$WHL"/*.whl
export PYTHONPATH="$SITE"
# Run outside the checkout, so `import searchlab` finds the wheel, not ./searchlab.
WORK="$(mktemp -d /tmp/gpu-check.XXXXXX)"
cd "$WORK"
python3 -c 'import searchlab, keras, optuna, mlflow, sys; print("python", sys.version.split()[0], "| searchlab from", searchlab.__file__, "| keras", keras.__version__, "| optuna", optuna.__version__, "| mlflow", mlflow.__version__)'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m searchlab.cli doctor || true

i=0
for spec in "$@"; do
  i=$((i + 1))
  read -r study args <<<"$spec"
  name="$(python3 -c 'import sys; from searchlab.study import load_study; print(load_study(sys.argv[1]).name)' "$WHL/$study")"
  for precision in $PRECISIONS; do
    home="$WORK/$i-$name-$precision"  # a fresh study per argument and precision
    echo "== $study $args --precision $precision (KERAS_BACKEND=$KERAS_BACKEND)"
    start=$(date +%s.%N)
    # shellcheck disable=SC2086 # $args holds several flags
    SEARCHLAB_HOME="$home" python3 -m searchlab.cli run "$WHL/$study" $args --precision "$precision"
    end=$(date +%s.%N)
    echo "wall $(python3 -c "print(f'{$end - $start:.1f}')")s for the whole command"
    SEARCHLAB_HOME="$home" python3 "$WHL/trial_times.py" "$name" \
      --label "$i:$KERAS_BACKEND-$precision" | tee -a "$WORK/times.txt"
  done
done
echo "== per-trial times"
cat "$WORK/times.txt"
if [ -n "${OUT:-}" ]; then cp "$WORK/times.txt" "$OUT/" 2>/dev/null || true; fi
