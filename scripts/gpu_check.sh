#!/usr/bin/env bash
# The GPU check, for one call of a lent CUDA machine (under 8 minutes): installs the carried wheels
# (torchnet, visdom, hickle and the pure-Python needs the machine lacks), unpacks the carried CIFAR
# archive, and runs the correctness checks (a, d, e, f) and then the speed checks (b, c)
# (scripts/gpu_check.py says what each measures), each with a time budget, into $OUT/gpu_check.json
# and $OUT/gpu_check.log. A failed check is recorded and the next one runs; the exit status is
# non-zero if any failed (an inconclusive check is no failure, and no pass: the JSON's status says
# so). With no wheels or no archive it writes the JSON with the reason and stops; so does the driver
# where torch cannot be imported. Every step has a cap (gpu_check.py's STEPS, reasoned in
# docs/gpu.md); with a margin they sum to the 480 s budget, and seconds a step leaves unused go to
# the next ones.
#
#   bash scripts/make_wheelhouse.sh          # here, once: .wheelhouse/ and .gpu_check/cifar10-jpg.tar.gz
#   bash scripts/gpu_check.sh                # there, carrying .wheelhouse and .gpu_check; $OUT is the
#                                            # tool's own: do not set it, or the results stay there
#   bash scripts/gpu_check.sh --rehearse     # here, on the CPU: tiny sizes, no install, the same JSON keys
#
# Options: --rehearse, --budget SECONDS (480; the whole run), --only a,c (others skipped),
# --archive FILE (.gpu_check/cifar10-jpg.tar.gz), --wheelhouse DIR (.wheelhouse), --keep-work,
# --install (install the wheels in a rehearsal too: the device's setup, on a CPU machine),
# --unfixed (check f tests nvjpeg without the side-stream fix: it must say caught or inconclusive).
# Environment: OUT (default /tmp/gpu_check), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
REHEARSE=0 INSTALL= BUDGET=480 ONLY= ARCHIVE=.gpu_check/cifar10-jpg.tar.gz WHEELS=.wheelhouse KEEP= UNFIXED=
while [ $# -gt 0 ]; do
  case "$1" in
    --rehearse) REHEARSE=1 ;;
    --budget|--only|--archive|--wheelhouse)
      [ $# -ge 2 ] || { echo "gpu_check.sh: error: $1 needs a value" >&2; exit 2; }
      case "$1" in --budget) BUDGET=$2 ;; --only) ONLY=$2 ;; --archive) ARCHIVE=$2 ;; *) WHEELS=$2 ;; esac; shift ;;
    --keep-work) KEEP=--keep-work ;;
    --install) INSTALL=1 ;;
    --unfixed) UNFIXED=--unfixed ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ "$BUDGET" =~ ^[0-9]+([.][0-9]+)?$ ]] && [ "${BUDGET%%.*}" -gt 0 ] ||
  { echo "gpu_check.sh: error: --budget must be a positive number of seconds, got '$BUDGET'" >&2; exit 2; }
CHECK_NAMES="a b c d e f a_cuda_vs_cpu b_at_epoch c_benchmark d_resume e_imagenet f_nvjpeg_half"
for c in ${ONLY//,/ }; do
  [[ " $CHECK_NAMES " == *" $c "* ]] ||
    { echo "gpu_check.sh: error: --only names checks a-f (or $CHECK_NAMES), got '$c'" >&2; exit 2; }
done
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: > "$LOG"
say() { echo "gpu_check.sh: $*" | tee -a "$LOG"; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
if [ -z "$KEEP" ]; then trap 'rm -rf "$WORK"' EXIT; fi
export PYTHONUNBUFFERED=1

install=skipped install_s=0
INSTALL=${INSTALL:-$((1 - REHEARSE))}
# a run that cannot work says why in the JSON at once, rather than spending the call
stop() {
  say "stopped: $1"
  local mode=device
  [ "$REHEARSE" = 0 ] || mode=rehearsal
  "$PY" scripts/gpu_check.py stop --out "$OUT" --reason "$1" --mode "$mode"
  exit 1
}
if [ "$INSTALL" = 1 ] && ! compgen -G "$WHEELS/*.whl" > /dev/null; then
  stop "no wheels in $WHEELS: run scripts/make_wheelhouse.sh here and carry $WHEELS"
fi
if [ "$REHEARSE" = 0 ] && [ ! -f "$ARCHIVE" ]; then
  stop "no archive $ARCHIVE: run scripts/make_wheelhouse.sh here and carry $(dirname "$ARCHIVE")"
fi
if [ "$REHEARSE" = 1 ]; then
  say "rehearsal on the CPU: a tiny generated CIFAR stands in for the archive"
  export CUDA_VISIBLE_DEVICES=
  # one thread per process: on 2 shared cores, torch's 2 OpenMP threads wait on each other (20x slower steps)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  "$PY" scripts/gpu_check.py tiny-cifar "$WORK/src/cifar10-jpg" 2>&1 | tee -a "$LOG"
  tar -czf "$WORK/tiny-cifar.tar.gz" -C "$WORK/src" cifar10-jpg
  ARCHIVE=$WORK/tiny-cifar.tar.gz
fi
if [ "$INSTALL" = 1 ]; then
  t=$(date +%s)
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  shopt -u nullglob
  say "installing ${#wheels[@]} wheels from $WHEELS into $WORK/site"
  if timeout "$("$PY" scripts/gpu_check.py cap install)" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
       --upgrade --target "$WORK/site" "${wheels[@]}" 2>&1 | tee -a "$LOG"; then
    install=ok
  else
    install=failed
    say "the wheel install failed; the checks will run and say what is missing"
  fi
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  install_s=$(( $(date +%s) - t ))
fi

t=$(date +%s)
unpack=failed
mkdir -p "$WORK/data"
if timeout "$("$PY" scripts/gpu_check.py cap unpack)" tar -xzf "$ARCHIVE" -C "$WORK/data" 2>&1 | tee -a "$LOG" && [ -d "$WORK/data/cifar10-jpg/train" ]; then
  unpack=ok
else
  say "could not unpack $ARCHIVE into a cifar10-jpg/train folder"
fi
unpack_s=$(( $(date +%s) - t ))
archive_bytes=$(stat -c %s "$ARCHIVE" 2>/dev/null || echo 0)
say "install $install (${install_s}s), unpack $unpack (${unpack_s}s), $(( $(date +%s) - START ))s of ${BUDGET}s used"

set +e
"$PY" scripts/gpu_check.py run --out "$OUT" --dataroot "$WORK/data/cifar10-jpg" --budget "$BUDGET" --start "$START" \
  --work "$WORK/run" ${ONLY:+--only "$ONLY"} $KEEP $UNFIXED $([ "$REHEARSE" = 1 ] && echo --rehearse) \
  --setup "{\"install\": \"$install\", \"install_s\": $install_s, \"wheels\": \"$WHEELS\", \"unpack\": \"$unpack\", \"unpack_s\": $unpack_s, \"archive\": \"$ARCHIVE\", \"archive_bytes\": $archive_bytes}"
rc=$?
set -e
if [ -n "$KEEP" ]; then say "work folder kept: $WORK"; fi
exit $rc
