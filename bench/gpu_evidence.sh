#!/usr/bin/env bash
# The evidence ablation on one GPU at 10x each row's steps, with the pretrained MiniLM text tower: does the
# token level (CMVM/CMLM) or the task level (L_task) pay off with budget? Table `ablation` of
# bench/evidence.py (contrastive only; + AMF, the demo; + L_task; + CMVM/CMLM; the full objective), 3 seeds,
# each row at 10x the steps it trains on the CPU (its share of the demo's budget), bf16 autocast.
#
# Prepare here (the device has no network, no emoji set, no MiniLM, no hydra-core):
#   .venv/bin/python bench/gpu_pack.py        # writes .gpu/ (ignored by git; under the 64 MiB transfer limit)
# then one device call: carry [".gpu"], timeout_s 600, command
#   bash bench/gpu_evidence.sh
#
# Runs PARALLEL (row, seed) runs at a time on the one GPU, seeds in order (every row's seed 42 first), and
# starts no run after DEADLINE_S; a run still going at the deadline is stopped and has no record. Writes
# $OUT/evidence_gpu.tar (records, the ablation table built from them, each run's log), or without $OUT
# logs/bench/evidence_gpu/. Afterwards, here: tar xf <files_at>/evidence_gpu.tar -C bench/results/
#   SCALE=10 PARALLEL=8 DEADLINE_S=500 bash bench/gpu_evidence.sh
#   SCALE=0.01 PARALLEL=2 DEVICE=cpu SEEDS=42 ROWS="contrastive only" bash bench/gpu_evidence.sh  # a CPU check
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
SCALE=${SCALE:-10}
PARALLEL=${PARALLEL:-8}
DEADLINE_S=${DEADLINE_S:-500}
DEVICE=${DEVICE:-gpu}
SEEDS=${SEEDS:-42 43 44}
SITE=${COTS_BENCH_SITE:-/tmp/site}
WORK=${WORK:-/tmp/evidence_gpu}
PACK=.gpu
start=$(date +%s)

[ -d "$PACK" ] || { echo "no $PACK/: run bench/gpu_pack.py here first and carry .gpu"; exit 2; }
if compgen -G "$PACK/whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$PACK"/whl/*.whl
fi
export PYTHONPATH="$SITE:$PWD:$PWD/tokenizers${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

rm -rf "$WORK" && mkdir -p "$WORK/results" "$WORK/logs" "$WORK/runs" tokenizers/artifacts
"$PY" bench/gpu_unpack.py "$PACK" "$WORK/data" "$WORK/minilm"
cp "$PACK/emoji_dvae.safetensors" tokenizers/artifacts/emoji_dvae.safetensors
cp bench/results/evidence/step_times.json "$WORK/results/"  # the CPU calibration: each row's share of the budget
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null || echo "nvidia-smi: not available"

if [ -n "${ROWS:-}" ]; then
  IFS=';' read -r -a rows <<<"$ROWS"
else
  mapfile -t rows < <("$PY" -c "import sys; sys.path.insert(0, 'bench'); import evidence
print('\n'.join(r.name for r in evidence.TABLES['ablation'].rows))")
fi

run() {  # one (row, seed) until the deadline
  local seed=$1 row=$2 left=$((start + DEADLINE_S - $(date +%s)))
  local log="$WORK/runs/$(echo "$row" | tr -c 'A-Za-z0-9_\n' '_')__seed$seed.log"
  if [ "$left" -le 30 ]; then echo "not started (deadline): $row, seed $seed"; return 0; fi
  echo "start: $row, seed $seed ($left s left)"
  local overrides=(
    "paths.data_dir=$WORK/data"
    "trainer.accelerator=$DEVICE"
    "trainer.precision=bf16-mixed"
    "model.encoder.text_tower.pretrained=$WORK/minilm"
    "data.text_tokenizer.pretrained=$WORK/minilm"
  )
  timeout --signal=KILL "$left" "$PY" bench/evidence.py run ablation --only "$row" --seeds "$seed" \
    --budget-scale "$SCALE" --results "$WORK/results" --logs "$WORK/logs" --checkpoint-every 1000000 \
    --overrides "${overrides[@]}" >"$log" 2>&1 && echo "done: $row, seed $seed" || echo "stopped ($?): $row, seed $seed"
}
export -f run
export start DEADLINE_S SCALE WORK PY DEVICE
jobs_list() { for seed in $SEEDS; do for row in "${rows[@]}"; do printf '%s\t%s\n' "$seed" "$row"; done; done; }
# each job: seed<TAB>row; xargs keeps PARALLEL going
jobs_list | tr '\n' '\0' | xargs -0 -P "$PARALLEL" -I{} bash -c \
  'IFS=$'"'"'\t'"'"' read -r seed row <<<"$1"; run "$seed" "$row"' _ {}

"$PY" bench/evidence.py table ablation --results "$WORK/results" || true
dest=${OUT:-logs/bench/evidence_gpu}
mkdir -p "$dest" "$WORK/bundle/evidence_gpu"
cp -r "$WORK/results/ablation" "$WORK/results/ablation.md" "$WORK/bundle/evidence_gpu/" 2>/dev/null || true
cp -r "$WORK/runs" "$WORK/bundle/evidence_gpu/logs"
tar cf "$dest/evidence_gpu.tar" -C "$WORK/bundle" evidence_gpu
echo "wrote $dest/evidence_gpu.tar in $(($(date +%s) - start)) s: $(ls "$WORK/results/ablation" 2>/dev/null | wc -l) records"
