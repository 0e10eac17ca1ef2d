#!/usr/bin/env bash
# Paper scale on a lent GPU, in one call (issue: Fig. 1 at widths up to 4096 on the full
# training set, and SAM's cost on CUDA).  Installs nothing: run it after the README's install
# command (`pip install torch==2.13.0 -e ".[dev]"`, or the CUDA torch the machine has).
#
#   OUT=/some/dir bash benchmarks/gpu_paper.sh          # on a GPU: about 9 minutes
#   OUT=/tmp/t bash benchmarks/gpu_paper.sh --tiny      # on a CPU, in about a minute (CI)
#
# Writes under $OUT: device.json (what ran it), sam_step.json (SAM / SGD, mupp / pytorch-
# optimizer, last-layer / SGD step times and peak memory per optimizer), sweep_throughput.json
# (vectorized against sequential configurations per hour), tf32_check.json (TF32 against fp32
# on a slice), mlp-cifar10-paper/ (the preset's sweep database, transfer table, figures) and
# status.txt (each part's exit code).  The quick measurements run first; the sweep gets the
# rest of the call ($SWEEP_SECONDS, default 420) and resumes where it stopped when rerun.
set -uo pipefail
OUT=${OUT:-runs/gpu_paper}
TINY=0
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=1 ;;
    *) echo "usage: OUT=DIR bash benchmarks/gpu_paper.sh [--tiny]" >&2; exit 2 ;;
  esac
done
HERE=$(cd "$(dirname "$0")" && pwd)
# the data: $MUPP_DATA_DIR, else shared/datasets beside the checkout or inside it
DATA=${MUPP_DATA_DIR:-$HERE/../../shared/datasets}
[ -d "$DATA" ] || DATA=$HERE/../shared/datasets
DEVICE=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
mkdir -p "$OUT" || { echo "gpu_paper: cannot create OUT=$OUT" >&2; exit 2; }
: > "$OUT/status.txt"

python - > "$OUT/device.json" <<'PY'
import json, platform, torch
cuda = torch.cuda.is_available()
print(json.dumps({
    "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
    "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
    "cpu_threads": torch.get_num_threads(),
}, indent=1))
PY

if [ "$TINY" = 1 ]; then
  STEP=(--widths 64 --steps 1 --repeats 1)
  THRU=(--widths 32 --epochs 1 --train-subset 256 --base-width 16)
  TF32=(--width 32 --epochs 1 --train-subset 256 --test-subset 256)
  SWEEP=(--grid width=16,32 --set base_width=16 --grid seed=0 --grid rho=0,0.1
         --set epochs=1 --set train_subset=512 --set test_subset=256)
else
  STEP=(--widths 1024,4096 --memory)
  THRU=(--widths 1024 --epochs 1 --train-subset 8192 --base-width 256)
  TF32=(--width 1024 --epochs 2)
  SWEEP=()
fi

part() {  # part NAME COMMAND...: run one part, record its exit code, go on either way
  local name=$1; shift
  echo "== $name: $*"
  "$@"
  local rc=$?
  echo "$name $rc" >> "$OUT/status.txt"
}

part sam_step python "$HERE/sam_step.py" --device "$DEVICE" "${STEP[@]}" --json "$OUT/sam_step.json"
part sweep_throughput python "$HERE/sweep_throughput.py" --device "$DEVICE" "${THRU[@]}" \
  --data-dir "$DATA" --json "$OUT/sweep_throughput.json"
part tf32_check python "$HERE/tf32_check.py" --device "$DEVICE" "${TF32[@]}" \
  --data-dir "$DATA" --json "$OUT/tf32_check.json"
STUDY="$OUT/mlp-cifar10-paper"
part sweep timeout "${SWEEP_SECONDS:-420}" mupp sweep --preset mlp-cifar10-paper --out "$STUDY" \
  --data-dir "$DATA" --vectorize on --set device="$DEVICE" --workers 1 --no-progress "${SWEEP[@]}"
part transfer sh -c "mupp transfer --out '$STUDY' --json '$STUDY/transfer.json' > '$STUDY/transfer.txt'"
part plot mupp plot --out "$STUDY"
cat "$OUT/status.txt"
