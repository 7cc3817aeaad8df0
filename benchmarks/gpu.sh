#!/usr/bin/env bash
# dvd GPU check: the vision server's model and the feature path on one GPU, in under 8 minutes.
#
#   benchmarks/gpu.sh [--kit DIR] [--cpu-smoke] [-- extra flags of benchmarks.gpu.main]
#   benchmarks/gpu.sh --make-kit DIR      (on a machine with pip: see benchmarks/gpu/stubs.py)
#
# For a GPU host without internet and without vLLM whose Python has torch (CUDA), grpcio,
# transformers, numpy and Pillow. It measures, with random weights, in bf16:
#   - the GPU's dense bf16 matmul rate (the ceiling),
#   - tiles/s of vision_server.model.InternVLVision at InternViT-300M and InternViT-6B shapes
#     for batches of 1..64 tiles, and what fraction of the matmul rate that is,
#   - features from GPU memory to a second process through grpc and shm, beside
#     device-to-host, memcpy and socket ceilings.
# Reports go to $OUT (default benchmarks/out/gpu-<time>): report.json and summary.txt, written
# section by section. The transfer section needs dvd's generated gRPC stubs (dvd/v1); where
# they are missing and grpcio-tools is absent, give --kit DIR made by --make-kit (carry it).
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3), OUT,
# GPU_CHECK_LIMIT_S (hard limit of the measurement, default 450 s; the Python part stops
# starting new work 60 s before it).
# Exit status: 0 all measured; 1 something failed or was skipped (see summary.txt);
# 2 no usable GPU or Python; 124 the hard limit was hit (partial reports remain in $OUT).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
LIMIT_S=${GPU_CHECK_LIMIT_S:-450}
KIT=""
SMOKE=()
EXTRA=()

fail() { echo "gpu.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --make-kit)
      [[ $# -ge 2 ]] || fail "--make-kit needs a folder"
      exec "$PYTHON" -m benchmarks.gpu.stubs make-kit --kit "$2" ;;
    --kit) [[ $# -ge 2 ]] || fail "--kit needs a folder"; KIT=$(cd "$2" && pwd); shift 2 ;;
    --cpu-smoke) SMOKE=(--cpu-smoke); shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) fail "unknown argument $1 (see --help)" ;;
  esac
done

OUT=${OUT:-$ROOT/benchmarks/out/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

command -v "$PYTHON" >/dev/null 2>&1 || fail "no Python at '$PYTHON' (set PYTHON=...)"
"$PYTHON" - <<'EOF' || fail "this Python cannot run the check (see the error above)"
import sys
missing = []
for module in ("torch", "numpy", "grpc"):
    try:
        __import__(module)
    except Exception as exc:
        missing.append(f"{module} ({type(exc).__name__}: {exc})")
if missing:
    sys.exit("missing: " + ", ".join(missing))
EOF

SKIP=()
if [[ ${#SMOKE[@]} -eq 0 ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu.sh: torch sees no CUDA device; the report will say so (use --cpu-smoke on a CPU)" >&2
fi
if exports=$("$PYTHON" -m benchmarks.gpu.stubs ensure ${KIT:+--kit "$KIT"}); then
  eval "$exports"
else
  SKIP=(--skip-transfer "dvd/v1 gRPC stubs unavailable (see stderr of gpu.sh; give --kit DIR)")
  echo "gpu.sh: no dvd/v1 stubs: the transfer section is skipped, and the ViT section fails" \
    "while vision_server imports them (through dvd/vir_mode.py); make a kit with --make-kit" >&2
fi

budget=$(( LIMIT_S - 30 ))
set +e
timeout --signal=TERM --kill-after=20 "$LIMIT_S" \
  "$PYTHON" -m benchmarks.gpu.main --out "$OUT" --budget-s "$budget" \
  "${SMOKE[@]}" "${SKIP[@]}" "${EXTRA[@]}"
status=$?
set -e
if [[ $status -eq 124 || $status -eq 137 ]]; then
  echo "gpu.sh: stopped at the ${LIMIT_S} s limit; partial reports in $OUT" >&2
  status=124
fi
echo "gpu.sh: reports in $OUT (report.json, summary.txt), exit $status" >&2
exit $status
