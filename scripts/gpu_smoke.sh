#!/usr/bin/env bash
# One-GPU smoke test of the GPU path: vLLM rollouts, DeepSpeed on NCCL, weight sync into vLLM.
#
#   scripts/gpu_smoke.sh                 # the tiny arithmetic example (a random-init checkpoint, built in seconds)
#   scripts/gpu_smoke.sh /models/Qwen2.5-0.5B-Instruct   # or any small Hugging Face causal-LM checkpoint
#
# It first runs the GPU unit test of the vLLM engine (its log-probs equal the trainer's log softmax(logits / T),
# before and after a weight update), then a short GRPO job (STEPS steps) with rollout.engine=vllm, and checks the
# job's metrics. Prints PASS or FAIL with every number it checked; exit code 0 only on PASS.
#
# Needs: one CUDA GPU, and vllm / deepspeed / torch installed as in deploy/Dockerfile.
# Environment knobs: STEPS (default 3), RUN_DIR (default runs/gpu-smoke-<time>), PYTHON (default python),
# ZERO_STAGE (default 2; 3 shards the parameters), WEIGHT_SYNC (default object_store; nccl needs the trainer and
# vLLM on different GPUs, since NCCL refuses two ranks on one device: run it on a machine with 2+ GPUs and
# set the num_gpus fractions so they land apart).
#
# One GPU is shared by fractions of it (Ray's accounting, not memory limits): rollout 0.4 (vLLM takes
# gpu_memory_utilization = 0.5 of the memory), scoring 0.1, trainer 0.5. A trainer asking for a whole GPU
# (trainer.num_gpus=1) would leave none for the rollout worker, and Ray would wait forever.
set -euo pipefail

MODEL="${1:-}"
STEPS="${STEPS:-3}"
RUN_DIR="${RUN_DIR:-runs/gpu-smoke-$(date +%Y%m%d-%H%M%S)}"
PYTHON="${PYTHON:-python}"
ZERO_STAGE="${ZERO_STAGE:-2}"
WEIGHT_SYNC="${WEIGHT_SYNC:-object_store}"
cd "$(dirname "$0")/.."

fail() { echo "FAIL: $*" >&2; exit 1; }

echo "== preflight"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  || fail "nvidia-smi not found: this needs a machine with an NVIDIA GPU"
"$PYTHON" - <<'EOF' || fail "the GPU stack is not usable (see the error above; deploy/Dockerfile pins a working one)"
import torch, deepspeed, vllm
assert torch.cuda.is_available(), "torch sees no CUDA GPU"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), vllm {vllm.__version__}, deepspeed {deepspeed.__version__}, "
      f"GPU {torch.cuda.get_device_name(0)}")
EOF

echo "== vLLM engine on the GPU (log-probs vs teacher forcing, weight update)"
# -o addopts="": in this process, not on the suite's two pytest-xdist workers (which need not be installed here)
"$PYTHON" -m pytest -q -m gpu tests/test_vllm_engine.py -p no:cacheprovider -o addopts="" \
  || fail "the vLLM engine's GPU test failed"

echo "== GRPO, $STEPS steps, rollout.engine=vllm, DeepSpeed on NCCL -> $RUN_DIR"
SETS=(
  --set rollout.engine=vllm --set rollout.num_gpus=0.4 --set rollout.vllm.gpu_memory_utilization=0.5
  --set rollout.vllm.weight_sync="$WEIGHT_SYNC"
  --set scoring.num_gpus=0.1 --set algorithm.kl_coef=0.001
  --set trainer.num_gpus=0.5 --set trainer.num_workers=1 --set trainer.zero_stage="$ZERO_STAGE"
  --set model.dtype=bfloat16
  --set loop.steps="$STEPS" --set loop.prompts_per_step=16 --set loop.eval_every=0 --set loop.eval_size=64
  --set logging.progress=false
)
if [[ -n "$MODEL" ]]; then
  [[ -f "$MODEL/config.json" ]] || fail "$MODEL is not a Hugging Face checkpoint directory (no config.json)"
  SETS+=(--set "model.path=$MODEL" --set model.prepare=null --set rollout.max_new_tokens=32)
else  # the example's architecture and tokenizer, untrained: this checks the machinery, not learning
  SETS+=(--set model.path=checkpoints/arith-random --set model.prepare=examples.arith.warmstart:build_random)
fi
"$PYTHON" -m orchestrator.cli train examples/arith_grpo.yaml "${SETS[@]}" --run-dir "$RUN_DIR" \
  || fail "raylhf train exited with an error (see above)"

echo "== checks"
"$PYTHON" - "$RUN_DIR/metrics.jsonl" "$STEPS" <<'EOF'
import json, math, sys

path, steps = sys.argv[1], int(sys.argv[2])
records = [json.loads(line) for line in open(path)]
train = [r for r in records if r.get("step", 0) >= 1]
checks = []  # (what, value, ok)

def check(what, value, ok):
    checks.append((what, value, bool(ok)))

check("training steps logged", [r["step"] for r in train], [r["step"] for r in train] == list(range(1, steps + 1)))
check("policy version after the last step (a weight sync per step)", train[-1].get("policy_version") if train else None,
      bool(train) and train[-1].get("policy_version") == steps)
for key in ("reward/mean", "response_length/mean", "entropy", "time/generate", "time/train", "time/sync"):
    values = [r.get(key) for r in train]
    check(f"{key} finite each step", values,
          values and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values))
check("completions are non-empty", [r.get("response_length/mean") for r in train],
      all((r.get("response_length/mean") or 0) > 0 for r in train))
check("vLLM generated tokens", [r.get("tokens/generated") for r in train], all((r.get("tokens/generated") or 0) > 0 for r in train))

width = max(len(c[0]) for c in checks)
for what, value, ok in checks:
    shown = [round(v, 4) if isinstance(v, float) else v for v in value] if isinstance(value, list) else value
    print(f"  {'ok  ' if ok else 'BAD '} {what:<{width}}  {shown}")
failed = [c for c in checks if not c[2]]
print("PASS" if not failed else f"FAIL: {len(failed)} of {len(checks)} checks")
sys.exit(1 if failed else 0)
EOF
