#!/usr/bin/env bash
# Every GPU figure the project still waits for, in one command that fits a device lease (about
# 9 minutes of a 10-minute command), each table written as it finishes so that a stopped run
# still returns what it measured. Run from the repository root.
#
# Here, once (the GPU image has jax, flax, optax, orbax and tensorstore but not these):
#     bash benchmarks/gpu_session.sh wheels        # downloads them into .whl/ (git-ignored)
# There (the device tool: carry [".whl"], timeout_s 600):
#     bash benchmarks/gpu_session.sh run "$OUT"
# On a CPU, to check the script itself with tiny sizes (about 2 minutes; PYTHON: the interpreter,
# python3 by default, which on the GPU image has jax):
#     GPU_SESSION_SMOKE=1 PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh run /tmp/gpu_session
#
# In priority order, each under its own time limit (no case is started after its step's deadline):
#  1. ntk_engine.py, ResNet-18 per logit (class 0) at N = 500 (the issue's "a per-class kernel of
#     500 CIFAR-10 images in under a second"), 256 and 1024, against neural-tangents, with and
#     without factored layers (200 s);
#  2. the same traced over the logits at N = 256 and 1024 (150 s);
#  3. ntk_engine.py, the small CNN at N = 256 and 1024, also against Loo et al.'s method (80 s);
#  4. train_throughput.py, float32 against bfloat16 train steps (config.train.compute_dtype, 70 s).
set -uo pipefail

WHEELS=("ml-collections==1.1.0" "neural-tangents==0.6.5" "frozendict==2.5.1")

if [[ "${1:-}" == wheels ]]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  exit
fi
[[ "${1:-}" == run && -n "${2:-}" ]] || { echo "usage: $0 wheels | run OUTDIR" >&2; exit 2; }
out=$2
py=${PYTHON:-python3}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu_session_site .whl/*.whl || exit
  export PYTHONPATH=/tmp/gpu_session_site${PYTHONPATH:+:$PYTHONPATH}
fi
# The repository itself: the image has no editable install of ntk_scale.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# As in the H100 session of 2026-11-22: JAX's default preallocation (75%) would plan smaller tiles.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
cache=/tmp/gpu_session_jax_cache
started=$SECONDS

if [[ -n "${GPU_SESSION_SMOKE:-}" ]]; then  # every step's rows, ours and the peers', at tiny sizes
  per_logit=(--resnet_sizes 8) traced=(--resnet_sizes 8) cnn=(--sizes 16) train=(--models cnn --steps 2)
  limits=(80 80 60 60) deadlines=(30 30 30)
else
  per_logit=(--resnet_sizes 500,256,1024 --variants factored_layers=none) traced=(--resnet_sizes 256,1024)
  cnn=(--sizes 256,1024) train=(--max_seconds 20)
  limits=(200 150 80 70) deadlines=(160 100 50)
fi

# Runs a step under its time limit, its output into $out/<name>.txt; what it printed stays if it is stopped.
step() {
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit} s, at $((SECONDS - started)) s)" | tee -a "$out/steps.txt"
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "   exit $? after $((SECONDS - started)) s" | tee -a "$out/steps.txt"
  grep -v -e "^WARNING: All log messages" -e "^I0000 " "$out/$name.txt" | tail -n 25
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$py" -c "import jax, ntk_scale; print('jax', jax.__version__, jax.devices())"; } > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
step ntk_engine-resnet18-class0 "${limits[0]}" "$py" benchmarks/ntk_engine.py --models resnet18 \
  "${per_logit[@]}" --logits 0 --loo_max 0 --deadline_s "${deadlines[0]}" --compilation_cache "$cache"
step ntk_engine-resnet18-trace "${limits[1]}" "$py" benchmarks/ntk_engine.py --models resnet18 \
  "${traced[@]}" --logits trace --loo_max 0 --deadline_s "${deadlines[1]}" --compilation_cache "$cache"
step ntk_engine-cnn "${limits[2]}" "$py" benchmarks/ntk_engine.py --models cnn "${cnn[@]}" \
  --logits 0,trace --loo_max 256 --deadline_s "${deadlines[2]}" --compilation_cache "$cache"
step train_throughput-bfloat16 "${limits[3]}" "$py" benchmarks/train_throughput.py \
  --compute_dtypes bfloat16 "${train[@]}"
echo "done in $((SECONDS - started)) s; tables in $out" | tee -a "$out/steps.txt"
