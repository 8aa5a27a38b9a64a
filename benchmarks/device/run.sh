#!/usr/bin/env bash
# The whole GPU check in one call, for a lent H100/H200 (CuPy 14, no cuDNN, no internet).
#
#   make carry                          # here: .carry/wheels (chainer) + .carry/cifar10
#   bash benchmarks/device/run.sh       # there, in the repo root; results in $OUT
#
# Stages (each runs even when the one before failed; summary.json says which passed):
#   1 install   the carried wheels and smchainer into /tmp/pfx (no index, no deps)
#   2 env       versions, nvidia-smi, the GPU stack as Chainer sees it   -> env.json
#   2b cudnn    benchmarks/device/cudnn_probe.py (<= CUDNN_SECONDS, 60): the cuDNN 9 library
#               found, Chainer's conv + batch norm with cuDNN vs without (CUPY_TF32=0)
#                                                                          -> cudnn.json
#   3 tests     pytest tests/gpu (layers GPU == CPU, training loss falls,
#               the CuPy 14 shims compiled by NVRTC), TF32 off         -> pytest-gpu.xml
#   4 bench     VGG-16 images/s: Chainer's functions without and with cuDNN (chainer,
#               chainer-cudnn), smchainer's fused kernels, PyTorch eager with and without
#               cuDNN; TF32 on at batch 64/128/256/512 (BENCH_BATCHES) with a
#               profile, then fused vs PyTorch with TF32 off    -> bench-tf32.json, bench-fp32.json
#   4a amp      the same benchmark under mixed precision (AMP_MODES, default "fp16 bf16"):
#               Chainer's mixed16 + loss scaling and torch autocast + GradScaler for fp16,
#               torch autocast for bf16 (Chainer has none: recorded as unsupported), at batch
#               128/256 (AMP_BATCHES), each capped at AMP_SECONDS (90)   -> bench-amp-*.json
#   4b kernels  GPU time of every kernel and GEMM of a fused VGG-16 step at batch 256, layer
#               by layer (CUDA events, no Python in the figure)            -> kernels.json
#   4c example  examples/cifar10/train.py (the AWS example, unchanged) through smchainer-train
#               for EXAMPLE_EPOCHS (2) on the carried CIFAR-10, its epoch times from its
#               LogReport, then the same epochs in PyTorch eager (benchmarks/device/
#               example_epoch.py), capped at EXAMPLE_SECONDS (120)          -> example.json
#   5 train     smchainer-train on CIFAR-10 under a time cap, fused kernels unless their GPU
#               tests failed (TRAIN_KERNELS overrides)         -> train.json
#   summary.json, run.log                                             (12 files in $OUT)
#
# Knobs (environment): DEADLINE (seconds for the whole script, default 420: the training
# stage gets what is left of it, at most TRAIN_SECONDS), TEST_SECONDS BENCH_SECONDS
# TRAIN_SECONDS EPOCHS (else chosen to fit, at most MAX_EPOCHS, 40) TRAIN_BATCH TRAIN_LR
# TRAIN_SCHEDULE TRAIN_KERNELS, TRAIN_EXTRA_HP ("key=value ..." added as --hp),
# BENCH_BATCHES (default "64 128 256 512"), CUDNN_SECONDS, AMP_MODES AMP_BATCHES
# AMP_FRAMEWORKS AMP_SECONDS, EXAMPLE_SECONDS EXAMPLE_EPOCHS (the amp and example stages
# are also cut to what is left before DEADLINE), MPI_BENCH=1 (adds stage mpi: benchmarks/mpi_scaling.py --device gpu, the
# end-to-end epoch and NCCL vs no communicator on one rank, capped at MPI_SECONDS, default
# 150, before train; writes mpi_scaling-*.json), PYTHON (default python3), SKIP (stage names to skip:
# size install env cudnn tests bench amp kernels example train).
set -u -o pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
OUT=${OUT:-$REPO/device-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1

export PYTHONUNBUFFERED=1
# cuDNN on: CuPy 14 has none of its own, smchainer.compat.cudnn binds the image's cuDNN 9
# (torch's lib/libcudnn.so.9; SMCHAINER_CUDNN_LIBRARY names another). CHAINER_CUDNN=0 is
# Chainer's own switch off (then `chainer` and `chainer-cudnn` run the same path).
export CHAINER_CUDNN=${CHAINER_CUDNN:-1}
export CUPY_TF32=${CUPY_TF32:-1}           # TF32 tensor cores for float32 GEMMs
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1  # commands run as root there
PY=${PYTHON:-python3}
PFX=/tmp/pfx
DEADLINE=${DEADLINE:-420}
TEST_SECONDS=${TEST_SECONDS:-180}
BENCH_SECONDS=${BENCH_SECONDS:-150}
TRAIN_SECONDS=${TRAIN_SECONDS:-240}
AMP_SECONDS=${AMP_SECONDS:-90}
EXAMPLE_SECONDS=${EXAMPLE_SECONDS:-120}
SKIP=${SKIP:-}
STAGES=/tmp/smchainer-stages
: > "$STAGES"
START=$(date +%s)

stamp() { echo "=== [$(( $(date +%s) - START ))s] $*"; }
skipped() { case " $SKIP " in *" $1 "*) echo "skipped $1"; echo "$1 skipped 0" >> "$STAGES"; return 0;; esac; return 1; }
# capped SECONDS: SECONDS, or what is left before DEADLINE (less 15 s) when that is less
capped() {
  local left=$(( DEADLINE - ($(date +%s) - START) - 15 ))
  if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
# record NAME COMMAND...: run one stage, log its status and time, never stop the script
record() {
  local name=$1; shift
  local t0=$(date +%s)
  stamp "stage $name: start"
  "$@"
  local rc=$?
  echo "$name $rc $(( $(date +%s) - t0 ))" >> "$STAGES"
  stamp "stage $name: exit $rc"
  return 0
}

# --- 0: what was carried ---------------------------------------------------------------------
check_size() {
  # The device tool carries at most 64 MiB (tree + carried folders); warn before it bites.
  local total
  if git rev-parse --git-dir > /dev/null 2>&1; then  # here: what a device call would carry
    total=$({ git ls-files -co --exclude-standard -z; printf '%s\0' .carry/wheels .carry/cifar10; } \
      | du -sck --files0-from=- | tail -1 | cut -f1)
  else  # there: the copy that was carried
    total=$(du -sk --exclude=device-out . | cut -f1)
  fi
  echo "working tree + carried: $((total / 1024)) MiB (limit 64 MiB)"
  ls -la .carry/wheels .carry/cifar10 2>&1
  [ "$total" -lt $((64 * 1024)) ]
}

# --- 1: install -------------------------------------------------------------------------------
install() {
  local wheels=(.carry/wheels/*.whl)
  [ -e "${wheels[0]}" ] || { echo "no wheels in .carry/wheels: run 'make carry' before"; return 1; }
  $PY -m pip install -q --no-index --no-deps --prefix "$PFX" "${wheels[@]}" || return 1
  # smchainer itself (console scripts, pytest plugin); setuptools is on the image
  $PY -m pip install -q --no-index --no-deps --no-build-isolation --prefix "$PFX" . || return 1
  $PY -m compileall -q "$PFX" > /dev/null  # 3.12 warns on Chainer's old escapes when compiling
  return 0
}
site_dir() {
  $PY -c "import sysconfig; print(sysconfig.get_path('purelib', vars={'base': '$PFX', 'platbase': '$PFX'}))"
}

# --- 2: env -----------------------------------------------------------------------------------
environment() {
  nvidia-smi || true
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv || true
  $PY - <<'EOF'
import json, os, subprocess, sys
import smchainer, chainer
from smchainer.compat.cupy import describe_gpu_stack
from smchainer.device import get_device
info = describe_gpu_stack()
info["smchainer"] = smchainer.__version__
info["smchainer_file"] = smchainer.__file__
try:
    import torch
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["torch_cudnn"] = torch.backends.cudnn.version()
except Exception as exc:
    info["torch"] = f"{type(exc).__name__}: {exc}"
try:
    get_device("gpu:0")
    info["get_device_gpu0"] = "ok"
except Exception as exc:
    info["get_device_gpu0"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(info, indent=2))
with open(os.path.join(os.environ["OUT"], "env.json"), "w") as f:
    json.dump(info, f, indent=2)
sys.exit(0 if info.get("get_device_gpu0") == "ok" else 1)
EOF
}

# --- 3: tests ---------------------------------------------------------------------------------
gpu_tests() {
  # The carried CIFAR-10 zips are the tests' shared data (the cifar10 fixture).
  mkdir -p /tmp/smchainer-shared/data
  ln -sfn "$REPO/.carry/cifar10" /tmp/smchainer-shared/data/cifar10
  # TF32 off: the layer tests then hold GPU and CPU to float32 tolerances.
  SMCHAINER_SHARED=/tmp/smchainer-shared CUPY_TF32=0 SMCHAINER_REQUIRE_GPU=1 \
    timeout -k 10 "$TEST_SECONDS" \
    $PY -m pytest tests/gpu -m "gpu or not slow" -p no:cacheprovider -q -ra \
      --junitxml "$OUT/pytest-gpu.xml"
}

# --- 4: bench ---------------------------------------------------------------------------------
# bench TF32 NAME SECONDS ARGS...: train_throughput.py under a time cap
bench() {
  local tf32=$1 name=$2 seconds=$3 rc dmon=""; shift 3
  [ "$seconds" -ge 20 ] || { echo "only ${seconds}s left before the deadline"; return 1; }
  # GPU utilisation once a second while it runs: low "sm" means the step is host-bound.
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi dmon -s u -d 1 > "/tmp/dmon-$name.txt" 2>&1 &
    dmon=$!
  fi
  CUPY_TF32=$tf32 timeout -k 10 "$seconds" \
    $PY benchmarks/train_throughput.py --device gpu --batch-sizes 64 128 \
      --out "$OUT/$name" "$@"  # a later --batch-sizes wins
  rc=$?
  if [ -n "$dmon" ]; then
    kill "$dmon" 2> /dev/null
    echo "--- nvidia-smi dmon during $name"; cat "/tmp/dmon-$name.txt"
  fi
  return $rc
}

# --- 4c: example ------------------------------------------------------------------------------
# The AWS example script, unchanged, through smchainer-train; then the same epochs in PyTorch.
example() {
  local seconds
  seconds=$(capped "$EXAMPLE_SECONDS")
  [ "$seconds" -ge 45 ] || { echo "only ${seconds}s left before the deadline"; return 1; }
  timeout -k 10 "$seconds" $PY benchmarks/device/example_epoch.py --device gpu \
    --cifar10 .carry/cifar10 --cache-dir /tmp/smchainer-cache --epochs "${EXAMPLE_EPOCHS:-2}" \
    --seconds $(( seconds - 10 )) --out "$OUT/example.json"
}

# --- 5: train ---------------------------------------------------------------------------------
# Epochs are chosen so that the whole learning-rate schedule fits the time cap: a schedule
# cut short by the cap would report the accuracy of a half-trained model.
choose_epochs() {
  if [ -n "${EPOCHS:-}" ]; then echo "$EPOCHS"; return; fi
  $PY - "$OUT/bench-tf32.json" "$TRAIN_SECONDS" "${TRAIN_BATCH:-128}" "$1" "${MAX_EPOCHS:-40}" <<'EOF'
import json, sys
path, seconds, batch, kernels, most = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
name = "smchainer-fused" if kernels == "fused" else "chainer"
try:
    record = json.load(open(path))
    bench = next(f for f in record["frameworks"] if f["framework"] == name)
    figures = {r["batch_size"]: r["images_per_s"] for r in bench["results"] if "images_per_s" in r}
    ips = figures.get(batch) or min(figures.values())
except Exception:
    ips = 1500.0  # no benchmark figure: a guess, on the safe side
# An epoch: 50k training images at 60% of the bare step's speed (the last run reached 64%:
# extensions, evaluation set-up), 10k evaluated at twice it, 1 s of extensions; 40 s to
# decode the data and start.
epoch_seconds = 50000 / (0.6 * ips) + 10000 / (2 * ips) + 1.0
print(max(1, min(most, int((seconds - 40) / epoch_seconds))))
EOF
}
# The fused kernels train unless their GPU tests failed in this run.
train_kernels() {
  if [ -n "${TRAIN_KERNELS:-}" ]; then echo "$TRAIN_KERNELS"; return; fi
  $PY - "$OUT/pytest-gpu.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    cases = ET.parse(sys.argv[1]).getroot().iter("testcase")
    bad = [c for c in cases
           if any(name in c.get("classname", "") for name in ("test_fused", "test_augment"))
           and (c.find("failure") is not None or c.find("error") is not None)]
    print("chainer" if bad else "fused")
except Exception:
    print("fused")  # no test report: the benchmark stage will have said whether they run
EOF
}
train() {
  local epochs job=/tmp/vgg-job
  local left=$(( DEADLINE - ($(date +%s) - START) - 15 ))
  [ "$left" -lt "$TRAIN_SECONDS" ] && TRAIN_SECONDS=$left
  [ "$TRAIN_SECONDS" -ge 60 ] || { echo "only ${TRAIN_SECONDS}s left before the deadline"; return 1; }
  local kernels
  kernels=$(train_kernels)
  epochs=$(choose_epochs "$kernels")
  echo "training for $epochs epochs with kernels=$kernels (cap ${TRAIN_SECONDS}s)"
  rm -rf "$job"
  local t0=$(date +%s)
  # smchainer-train, called through Python so that no console script is needed
  timeout -k 20 "$TRAIN_SECONDS" $PY -c \
    'import sys; from smchainer.training.cli import main; sys.exit(main())' --job-dir "$job" \
    --channel train=.carry/cifar10/train.zip --channel test=.carry/cifar10/test.zip \
    --hp epochs="$epochs" --hp batch-size="${TRAIN_BATCH:-128}" \
    --hp learning-rate="${TRAIN_LR:-0.1}" --hp lr-schedule="${TRAIN_SCHEDULE:-onecycle}" \
    --hp progress-bar=false --hp cache-dir=/tmp/smchainer-cache --hp kernels="$kernels" \
    $(for hp in ${TRAIN_EXTRA_HP:-}; do printf -- '--hp %s ' "$hp"; done)
  local rc=$?
  $PY - "$job" "$rc" "$(( $(date +%s) - t0 ))" "$epochs" "$OUT/train.json" <<'EOF'
import glob, json, os, sys
job, rc, seconds, epochs, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
result = {"exit_code": rc, "timed_out": rc in (124, 137), "wall_seconds": seconds, "epochs": epochs}
for key, name in (("metrics", "metrics.json"), ("log", "log"), ("model", "smchainer-model.json")):
    for path in glob.glob(f"{job}/**/{name}", recursive=True):
        try:
            result[key] = json.load(open(path))
        except (OSError, ValueError):
            pass
failure = os.path.join(job, "output", "failure")
if os.path.exists(failure):
    result["failure"] = open(failure).read()[:4000]
json.dump(result, open(out, "w"), indent=2)
print(json.dumps({k: v for k, v in result.items() if k != "log"}, indent=2))
EOF
  return $rc
}

# --- run -------------------------------------------------------------------------------------
stamp "smchainer device run in $REPO, OUT=$OUT"
skipped size || record size check_size
skipped install || record install install
# The repo first: every stage runs this checkout's smchainer even if installing it failed.
export PYTHONPATH="$REPO:$(site_dir)${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$PFX/bin:$PATH"
export OUT
echo "PYTHONPATH=$PYTHONPATH"
skipped env || record env environment
skipped cudnn || record cudnn env CUPY_TF32=0 timeout -k 5 "${CUDNN_SECONDS:-60}" \
  $PY benchmarks/device/cudnn_probe.py --out "$OUT/cudnn.json"
skipped tests || record tests gpu_tests
skipped bench || record bench-tf32 bench 1 bench-tf32.json "$BENCH_SECONDS" --profile \
  --batch-sizes ${BENCH_BATCHES:-64 128 256 512}
skipped bench || record bench-fp32 bench 0 bench-fp32.json "$BENCH_SECONDS" \
  --frameworks smchainer-fused torch --batch-sizes 128 256
if ! skipped amp; then
  for mode in ${AMP_MODES:-fp16 bf16}; do
    record "bench-amp-$mode" bench 1 "bench-amp-$mode.json" "$(capped "$AMP_SECONDS")" \
      --amp "$mode" --frameworks ${AMP_FRAMEWORKS:-chainer chainer-cudnn smchainer-fused torch} \
      --batch-sizes ${AMP_BATCHES:-128 256}
  done
fi
skipped kernels || record kernels env CUPY_TF32=1 timeout -k 10 "${KERNEL_SECONDS:-60}" \
  $PY benchmarks/device/kernels.py --batch-size 256 --out "$OUT/kernels.json"
if [ "${MPI_BENCH:-0}" = 1 ]; then
  skipped mpi || record mpi timeout -k 10 "${MPI_SECONDS:-150}" $PY benchmarks/mpi_scaling.py \
    --device gpu --cifar10 .carry/cifar10 --output-dir "$OUT"
fi
skipped example || record example example
skipped train || record train train
stamp "done"
$PY benchmarks/device/summarize.py "$OUT" "$STAGES" || true
rm -f "$STAGES"
sleep 1  # let tee finish run.log
