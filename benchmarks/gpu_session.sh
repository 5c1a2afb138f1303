#!/usr/bin/env bash
# Every GPU figure the project still waits for, in one command that fits a device lease (at most
# 570 s of a 10-minute command), each table written as it finishes so that a stopped run still
# returns what it measured. Run from the repository root.
#
# Here, once (the GPU image has jax, flax, optax, orbax and tensorstore but not these):
#     bash benchmarks/gpu_session.sh wheels        # downloads them into .whl/ (git-ignored)
# There (the device tool: carry [".whl"], timeout_s 600):
#     bash benchmarks/gpu_session.sh run "$OUT"
# On a CPU, to check the script itself with tiny sizes (about 2 minutes; PYTHON: the interpreter,
# python3 by default, which on the GPU image has jax):
#     GPU_SESSION_SMOKE=1 PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh run /tmp/gpu_session
#
# In priority order, each under its own time limit and none past 570 s in all (no case is started
# after its step's deadline). ResNet-18 rows time one call after a warm-up one (XLA:GPU compiles a
# ResNet-18 program in up to two minutes); each plan line says how long planning (compiling) took.
# The H200 session of 2026-12-04 measured the rest (benchmarks/results/2026-12-04-h200-ntk_engine.txt):
# ResNet-18 per logit at N = 500 and traced at 256, Loo et al.'s method, the CNN at N = 256.
#  1. ntk_engine.py, ResNet-18 traced at N = 1024 against nt.batch (sizes tried from 256 down, each
#     a compile): since 2026-12-04 planned with each example's forward pass counted (one tile of
#     1024, two logits at a time, where the H200's plan was 36 tiles of 128: 2.92 s, 7.9x);
#  2. ntk_engine.py, the CNN at N = 256 and 1024, per logit and traced (the H200's N = 1024 stopped
#     unexplained after 130 s);
#  3. ntk_call_parts.py, where the CNN's one-tile kernel at N = 256 spends its 3-4 ms (against
#     neural-tangents' 2 ms there): placing parameters and images, the program, the copy back;
#  4. train_throughput.py, float32 against bfloat16 train steps (config.train.compute_dtype);
#  5. ntk_engine.py, ResNet-18 per logit (class 0) at N = 1024 against neural-tangents' one call
#     (46 GB of Jacobians), then at N = 500 (the issue's "a per-class kernel of 500 CIFAR-10 images
#     in under a second": 0.111 s on the H200).
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

total=570  # seconds for every step together, under the device's 600 s command limit
if [[ -n "${GPU_SESSION_SMOKE:-}" ]]; then  # every step's rows, ours and the peers', at tiny sizes
  trace_large=(--resnet_sizes 8 --nt_batch 4) cnn=(--sizes 16,24) parts=(--n 16 --calls 3)
  train=(--models cnn --steps 2) class0=(--resnet_sizes 8,12) deadline=40 total=400
else
  trace_large=(--resnet_sizes 1024 --nt_batch 256) cnn=(--sizes 256,1024) parts=(--n 256)
  train=(--max_seconds 20) class0=(--resnet_sizes 1024,500) deadline=100
fi

# Runs a step under its time limit (and what is left of the total), its output into
# $out/<name>.txt; what it printed stays if it is stopped.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((total - (SECONDS - started)))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then echo "== $name not started: ${left} s left" | tee -a "$out/steps.txt"; return; fi
  echo "== $name (limit ${limit} s, at $((SECONDS - started)) s)" | tee -a "$out/steps.txt"
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "   exit $? after $((SECONDS - started)) s" | tee -a "$out/steps.txt"
  grep -v -e "^WARNING: All log messages" -e "^I0000 " "$out/$name.txt" | tail -n 25
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$py" -c "import jax, ntk_scale; print('jax', jax.__version__, jax.devices())"; } > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
engine=("$py" benchmarks/ntk_engine.py --compilation_cache "$cache" --loo_max 0)
step ntk_engine-resnet18-trace-large 240 "${engine[@]}" --models resnet18 --logits trace --repeats 1 \
  "${trace_large[@]}"
step ntk_engine-cnn 130 "${engine[@]}" --models cnn --logits 0,trace "${cnn[@]}"
step ntk_call_parts 60 "$py" benchmarks/ntk_call_parts.py "${parts[@]}"
step train_throughput-bfloat16 70 "$py" benchmarks/train_throughput.py --compute_dtypes bfloat16 \
  "${train[@]}"
step ntk_engine-resnet18-class0 170 "${engine[@]}" --models resnet18 --logits 0 --repeats 1 \
  "${class0[@]}" --deadline_s "$deadline"
echo "done in $((SECONDS - started)) s; tables in $out" | tee -a "$out/steps.txt"
