#!/usr/bin/env bash
# Paper-scale training step on one GPU, offline, in under 8 minutes: ViT-B/16 at 384 px + BERT-base
# (from scratch), K=65536, bf16 autocast, fused attention (timm and BERT 'sdpa'). The full COTS step
# against the CLIP step on the same towers: ms/step, pairs/s, FLOPs, MFU against this card's bf16
# matmul rate measured in the same run (torch.mm 8192^3), peak memory. Runs bench/step_speed.py.
#
#   bash bench/gpu.sh                        # batch 128 (experiment=cots_vitb384), 10 warm-up + 20 timed steps
#   bash bench/gpu.sh --batch 64             # extra arguments go to bench/step_speed.py (flags and Hydra overrides)
#   bash bench/gpu.sh module.compile=null    # eager towers (cots_vitb384 compiles them, with fused AdamW)
#   OUT=/some/dir bash bench/gpu.sh          # JSON and log go to $OUT (default logs/bench)
#
# The machine needs python3 with torch (CUDA), timm and transformers. hydra-core, omegaconf, antlr4 and
# PyYAML come from the wheels in .whl/ at the repository root (no network needed). Prepare them with:
#   grep -q '^/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl hydra-core==1.3.2 omegaconf==2.3.0 PyYAML
#   python3 -m pip wheel --no-deps antlr4-python3-runtime==4.9.3 -w .whl   # only an sdist on PyPI; pure Python
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-logs/bench}
SITE=${COTS_BENCH_SITE:-/tmp/site}
mkdir -p "$OUT_DIR"

install_wheels() {
  local pip=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
  "${pip[@]}" .whl/*.whl 2>/dev/null && return
  "${pip[@]}" .whl/*-none-any.whl 2>/dev/null && return  # a wheel built for another Python (PyYAML) left out
  mkdir -p "$SITE" && for w in .whl/*.whl; do "$PY" -m zipfile -e "$w" "$SITE"; done  # no pip: a wheel is a zip
}
if compgen -G ".whl/*.whl" >/dev/null; then
  install_wheels
  echo "installed wheels from .whl/ into $SITE: $(ls "$SITE" | grep -c dist-info) packages"
else
  echo "no .whl/ folder: using the machine's own hydra-core / omegaconf"
fi
export PYTHONPATH="$SITE:$PWD:$PWD/tokenizers${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

nvidia-smi || echo "nvidia-smi: not available"
"$PY" - <<'PYEOF'
import importlib, sys
import torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, GPU: {gpu}")
missing = []
for name in ("timm", "transformers", "hydra", "omegaconf", "yaml", "cots.models.cots_model", "cots.objective"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '')} {module.__file__}")
    except Exception as err:  # report everything before giving up
        missing.append(name)
        print(f"  {name}: cannot import ({type(err).__name__}: {err})")
if "lightning" in sys.modules:
    print("  note: lightning was imported (not needed by bench/step_speed.py)")
if gpu == "none":
    print("  no CUDA device: only a CPU dry run can work here (pass --device cpu --dry-run)")
sys.exit(1 if missing else 0)
PYEOF

# The DALL-E encoder's weights (hundreds of MB) do not travel: the step takes dVAE tokens as from the
# token cache (random ids). With weights on the machine, add data.image_tokens.source=online.
timeout 450 "$PY" bench/step_speed.py --device cuda --precision bf16 --shapes paper --warmup 10 --steps 20 \
  --out "$OUT_DIR/step_paper_gpu.json" data.image_tokens.source=cache "$@" 2>&1 | tee "$OUT_DIR/step_paper_gpu.log"
exit "${PIPESTATUS[0]}"
