#!/usr/bin/env bash
# The prepared GPU check of one session lent a device (one H200; < 8 minutes of its time):
#   1. the CUDA-marked tests (pytest -m gpu),
#   2. bf16 step cost and peak memory of every objective on the Fashion-MNIST UNet and DMD2's ADM network
#      (benchmarks/bench_step.py, with the checkpointing mode),
#   3. the memory and speed switches before/after (benchmarks/bench_switches.py: activation checkpointing, fused
#      EMA, TF32, channels-last),
#   4. LCM against a plain fine-tune step on the tiny SD pipeline, bf16 (benchmarks/bench_t2i_step.py; issue 16
#      item 9: on the 2-core CPU in fp32 the three frozen forwards alone cost 0.80 of a fine-tune step).
# Results go to $OUT (at most 8 files come back): gpu_tests.log, step_cost_cuda_bf16.json, switches_cuda.json,
# t2i_step_cuda.json, nvidia_smi.txt, session.log.
#
# Here first: bash benchmarks/make_wheelhouse.sh   (the device reaches no registry; .whl/ is git-ignored)
# Then, through the device tool: run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=540)
# Without CUDA it runs a smoke version of each stage on the CPU (to check the script, not to measure).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/runs/gpu_session}
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
PY=${PYTHON:-python3}
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # the benchmarks run from benchmarks/
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$ROOT
else
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEVICE=cuda
  nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1 || true
  STEP_ARGS=(--networks fashion_mnist adm_dmd2 --warmup 3 --repeats 5 --ckpt-repeats 3 --no-lora)
  SWITCH_ARGS=(--parts checkpointing ema cuda_only --warmup 3 --repeats 5)
  T_TESTS=120 T_STEP=240 T_SWITCH=90 T_T2I=60
  T2I_ARGS=(--rounds 3 --pairs 10 --warmup 5 --threads 8)
else
  DEVICE=cpu  # smoke run of the same stages
  STEP_ARGS=(--networks fashion_mnist --objectives dmd --quick --ckpt-repeats 1 --no-lora)
  SWITCH_ARGS=(--parts ema cuda_only --ema-repeats 2)
  T_TESTS=120 T_STEP=300 T_SWITCH=120 T_T2I=300
  T2I_ARGS=(--quick --threads 2)
fi
MP=$([ "$DEVICE" = cuda ] && echo bf16 || echo no)
echo "== device $DEVICE, mixed precision $MP, $(date -u +%FT%TZ)"
"$PY" -c "import torch, diffusers, hydra, diffdistill; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"

echo "== 1/4 CUDA-marked tests"
timeout "$T_TESTS" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log"
echo "tests exit ${PIPESTATUS[0]} (5 = none selected/collected)"

echo "== 2/4 step cost and peak memory per objective ($MP)"
(cd benchmarks && timeout "$T_STEP" "$PY" bench_step.py --device "$DEVICE" --mixed-precision "$MP" \
  "${STEP_ARGS[@]}" --note "benchmarks/gpu_session.sh" --out "$OUT/step_cost_${DEVICE}_${MP}.json")
echo "bench_step exit $?"

echo "== 3/4 memory and speed switches"
(cd benchmarks && timeout "$T_SWITCH" "$PY" bench_switches.py --device "$DEVICE" --mixed-precision "$MP" \
  "${SWITCH_ARGS[@]}" --note "benchmarks/gpu_session.sh" --out "$OUT/switches_${DEVICE}.json")
echo "bench_switches exit $?"

echo "== 4/4 LCM vs fine-tune on the tiny SD pipeline ($MP)"
(cd benchmarks && timeout "$T_T2I" "$PY" bench_t2i_step.py --device "$DEVICE" --mixed-precision "$MP" \
  "${T2I_ARGS[@]}" --out "$OUT/t2i_step_${DEVICE}.json")
echo "bench_t2i_step exit $?"
ls -la "$OUT"
