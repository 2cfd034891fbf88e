#!/usr/bin/env bash
# Every GPU number issue 6 asks for, and Qwen2.5-VL-7B's (issue 12), on one lent H100/H200, in about 9 minutes
# (GPU_RUN_BUDGET_S, default 560).
#
#   bash benchmarks/gpu_run.sh            # from the repository root; needs torch with CUDA, transformers, peft
#
# Runs, in priority order (each under `timeout`, the next one starts whatever happened to the last; a run is
# skipped when less than MIN_RUN_S of the budget is left):
#   eager1    7b, 1 pair/step: plain, packed_sdpa, packed_pairs, packed_flex, each without and with grad ckpt; op profile
#   qwen7b    --family qwen2_5_vl 7b (a 1024x768 image, 999 image tokens), 1 pair/step: plain, packed_sdpa,
#             packed_pairs (its text model has no flex), 5 timed steps
#   compile1  7b, 1 pair/step: plain and packed_flex with torch.compile of each decoder layer, without and with
#             grad ckpt (the compiled plain step is the strongest baseline)
#   eager8    7b, 8 pairs/step, grad ckpt: plain, packed_pairs and packed_flex (without grad ckpt neither fits 80 GB)
#   compile8  7b, 8 pairs/step, grad ckpt: packed_flex compiled
#   compile1-bf16lora  as compile1 without grad ckpt, LoRA weights in bf16 instead of PEFT's fp32 (if time is left)
# Writes benchmarks/results/ (or $GPU_RUN_RESULTS) gpu-<device>-<date>-<run>.json (+ .log), -eager1-profile.txt, -compile1-profile.txt,
# -env.txt and -table.md (all runs in one markdown table). If $OUT is set (the device runner's output folder),
# everything written is also copied there. Exit status: 0 if every run succeeded, else 1.
# GPU_RUN_SMOKE=1 runs the same sequence at --size small on the CPU with 2 steps (checks this script, no numbers).
set -u
cd "$(dirname "$0")/.."

export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
BUDGET_S="${GPU_RUN_BUDGET_S:-560}"
MIN_RUN_S="${MIN_RUN_S:-75}"
PY="${PYTHON:-python}"
RES="${GPU_RUN_RESULTS:-benchmarks/results}"
mkdir -p "$RES"

START=$(date +%s)
DATE=$(date -u +%Y-%m-%d)
DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no-cuda')" 2>/dev/null || echo unknown)
SLUG=$(echo "$DEVICE" | sed -E 's/^NVIDIA //; s/[^A-Za-z0-9]+/-/g; s/-+$//' | tr 'A-Z' 'a-z')
TAG="$RES/gpu-${SLUG}-${DATE}"
SIZE_ARGS=(--size 7b --device cuda)
if [ "${GPU_RUN_SMOKE:-0}" = 1 ]; then
  SIZE_ARGS=(--size small --device cpu --steps 2)
  TAG="$RES/smoke-cpu-${DATE}"
fi
if [ "${GPU_RUN_SMOKE:-0}" != 1 ] && { [ "$DEVICE" = "no-cuda" ] || [ "$DEVICE" = "unknown" ]; }; then
  echo "gpu_run.sh: no CUDA device visible ($DEVICE); nothing to do" >&2
  exit 1
fi
STATUS=0
WRITTEN=()

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "device: $DEVICE"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv 2>&1 || true
  "$PY" - <<'EOF' 2>&1 || true
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
for p in ("transformers", "peft", "accelerate", "triton"):
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, "not installed")
EOF
} > "$TAG-env.txt"
WRITTEN+=("$TAG-env.txt")
cat "$TAG-env.txt"

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

bench() {  # bench NAME CAP_S ARGS... -> benchmarks/results/gpu-...-NAME.json
  local name=$1 cap=$2; shift 2
  local remaining; remaining=$(left)
  if [ "$remaining" -lt "$MIN_RUN_S" ]; then
    echo "=== $name: skipped, ${remaining}s of the budget left" | tee -a "$TAG-skipped.txt"
    WRITTEN+=("$TAG-skipped.txt")
    return 0
  fi
  local t=$(( cap < remaining ? cap : remaining ))
  echo "=== $name (limit ${t}s): step_bench.py $*"
  timeout -k 15 "$t" "$PY" benchmarks/step_bench.py "${SIZE_ARGS[@]}" --json "$TAG-$name.json" "$@" \
    > "$TAG-$name.log" 2>&1
  local rc=$?
  tail -n 25 "$TAG-$name.log"
  echo "=== $name: exit $rc after $(( $(date +%s) - START ))s total"
  [ "$rc" -eq 0 ] || STATUS=1
  WRITTEN+=("$TAG-$name.log")
  [ -f "$TAG-$name.json" ] && WRITTEN+=("$TAG-$name.json")
  return 0
}

bench eager1 210 --pairs-per-step 1 --grad-checkpointing both --variants plain,packed_sdpa,packed_pairs,packed_flex \
  --profile "$TAG-eager1-profile.txt"
[ -f "$TAG-eager1-profile.txt" ] && WRITTEN+=("$TAG-eager1-profile.txt")
bench qwen7b 100 --family qwen2_5_vl --pairs-per-step 1 --variants plain,packed_sdpa,packed_pairs --steps 5 --warmup 1
BASE1=(); [ -f "$TAG-eager1.json" ] && BASE1=(--baseline "$TAG-eager1.json")
bench compile1 260 --pairs-per-step 1 --grad-checkpointing both --variants plain,packed_flex --compile ${BASE1[@]+"${BASE1[@]}"} \
  --profile "$TAG-compile1-profile.txt"
[ -f "$TAG-compile1-profile.txt" ] && WRITTEN+=("$TAG-compile1-profile.txt")
bench eager8 200 --pairs-per-step 8 --grad-checkpointing on --variants plain,packed_pairs,packed_flex --warmup 1
BASE8=(); [ -f "$TAG-eager8.json" ] && BASE8=(--baseline "$TAG-eager8.json")
bench compile8 150 --pairs-per-step 8 --grad-checkpointing on --variants packed_flex --compile --warmup 2 ${BASE8[@]+"${BASE8[@]}"}
bench compile1-bf16lora 150 --pairs-per-step 1 --variants packed_flex --compile --adapter-dtype model \
  ${BASE1[@]+"${BASE1[@]}"}

shopt -s nullglob
JSONS=("$TAG"-*.json)
if [ ${#JSONS[@]} -gt 0 ]; then
  "$PY" benchmarks/step_bench.py --summarize "${JSONS[@]}" > "$TAG-table.md" 2>&1 || STATUS=1
  WRITTEN+=("$TAG-table.md")
  echo; cat "$TAG-table.md"
fi
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  mkdir -p "$OUT/benchmarks/results"
  cp "${WRITTEN[@]}" "$OUT/benchmarks/results/" 2>/dev/null || true
fi
echo "gpu_run.sh: done in $(( $(date +%s) - START ))s, status $STATUS"
exit "$STATUS"
