#!/usr/bin/env bash
# The GPU check: one command, about 10 minutes on one GPU (H100/H200 class). Prints, in order:
#   1. the tests that need CUDA (tests/test_cuda.py: the plan's bytes against a real bf16 CUDA step);
#   2. bf16 train-step tokens/s and MFU of mistral-1b (~1.3B, Mistral shape) on the sdpa spec, and on TE
#      when transformer_engine imports;
#   3. rollout tokens/s of mistral-1b against HF generate and against the bandwidth bound, eager and with
#      the decode step replayed from a CUDA graph (with the CUDA-graph rollout tests), and of SmolLM2;
#   4. `c2f plan`'s predicted peak for one PPO iteration of a ~1B config against torch.cuda.max_memory_allocated.
# Each part has its own time limit, and a failing part does not stop the rest; the exit code is the number
# of parts that failed.
#   bash benchmarks/gpu_check.sh            # PEAK_FLOPS / PEAK_BW: the GPU's bf16 dense FLOP/s and bytes/s
set -u
cd "$(dirname "$0")/.."
export PYTHONWARNINGS=ignore WANDB_MODE=disabled
PEAK_FLOPS=${PEAK_FLOPS:-989e12}   # H100 / H200 SXM, dense bf16
PEAK_BW=${PEAK_BW:-4.8e12}         # H200 HBM3e (H100 SXM: 3.35e12)
OUT=${OUT:-/tmp/c2f_gpu_check}
mkdir -p "$OUT"
failed=0
part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit} s)"
  local start=$SECONDS
  timeout "$limit" "$@" || { echo "=== $name FAILED (exit $?)"; failed=$((failed + 1)); }
  echo "=== $name: $((SECONDS - start)) s"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
part "CUDA tests" 90 python -m pytest -q -m cuda tests/test_cuda.py
part "train step, sdpa" 80 python benchmarks/train_step.py --preset mistral-1b --dtype bf16 --layer-spec sdpa \
  --micro-batch 4 --seq 2048 --steps 5 --warmup 2 --peak-flops "$PEAK_FLOPS"
if python -c "import transformer_engine.pytorch" 2>/dev/null; then
  part "train step, te" 80 python benchmarks/train_step.py --preset mistral-1b --dtype bf16 --layer-spec te \
    --micro-batch 4 --seq 2048 --steps 5 --warmup 2 --peak-flops "$PEAK_FLOPS"
else
  echo "=== train step, te: skipped (transformer_engine does not import here)"
fi
part "rollout" 90 python benchmarks/rollout.py --preset mistral-1b --dtype bf16 --batch 16 --prompt 128 --new 256 \
  --peak-bandwidth "$PEAK_BW"
part "CUDA-graph decode tests" 120 python -m pytest -q tests/test_rollout.py -k "cuda_graph or tp1"
part "rollout, CUDA graph" 90 python benchmarks/rollout.py --preset mistral-1b --dtype bf16 --batch 16 --prompt 128 \
  --new 256 --cuda-graph --peak-bandwidth "$PEAK_BW"
part "rollout, SmolLM2 fp32, CUDA graph" 90 python benchmarks/rollout.py --cuda-graph --peak-bandwidth "$PEAK_BW"
part "plan vs measured, PPO ~1B" 120 python benchmarks/plan_vs_measured.py examples/coarse_actor_cpu.yaml \
  model.preset=mistral-1b model.overrides.layer_spec=sdpa reward.kind=token_frequency data.source=synthetic \
  length.kind=fixed length.fixed_length=512 ppo.rollout_batch_size=16 ppo.mini_batch_size=8 ppo.micro_batch_size=4 \
  logging.wandb_mode=disabled "logging.run_dir=$OUT/ppo_1b"
echo "gpu_check: $failed part(s) failed"
exit "$failed"
