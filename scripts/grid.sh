# Sourced by table1.sh and cifar100.sh (imagenet.sh takes scaled_steps): the settings checks, the
# scaled lr schedule and the run step they share.
# The caller sets PROG, DRY, LOGS, EPOCHS, EPOCH_STEP, SEEDS, TEACHER_SEEDS, PYTHON, EXTRA and CIFAR_FLAGS.

die() { echo "$PROG: error: $*" >&2; exit 2; }

check_settings() {  # check_settings WEIGHT_VARIABLE...: every setting, before the first run starts
  [[ "$EPOCH_STEP" =~ ^\[\ *([1-9][0-9]*\ *(,\ *[1-9][0-9]*\ *)*)?\]$ ]] ||
    die "EPOCH_STEP must be a JSON list of epochs from 1 on, like [60,120,160]; got '$EPOCH_STEP'"
  local s v
  for s in $SEEDS $TEACHER_SEEDS; do
    [[ "$s" =~ ^[0-9]+$ ]] || die "SEEDS and TEACHER_SEEDS list whole numbers from 0 on, got '$s'"
  done
  [ -n "${SEEDS// /}" ] && [ -n "${TEACHER_SEEDS// /}" ] || die "SEEDS and TEACHER_SEEDS must name at least one seed"
  for v in "$@"; do
    [[ "${!v}" =~ ^[0-9]*[.]?[0-9]+([eE][+-]?[0-9]+)?$ ]] || die "$v must be a number from 0 on, got '${!v}'"
  done
  command -v "$PYTHON" > /dev/null || die "PYTHON=$PYTHON: command not found (activate the project's venv)"
}

scaled_steps() {  # scaled_steps EPOCHS BASE OFFSET STEP...: a BASE-epoch schedule's lr steps for EPOCHS
  # epochs, rounded half up, plus OFFSET, never below 2: the lr drops at the start of each listed
  # epoch, so 1 would skip the full lr
  local epochs=$1 base=$2 offset=$3 s n out=()
  shift 3
  for s in "$@"; do n=$(( (2 * s * epochs + base) / (2 * base) + offset )); out+=($(( n < 2 ? 2 : n ))); done
  echo "[$(IFS=,; echo "${out[*]}")]"
}

suffix() { [ "$1" = 0 ] && echo "" || echo "_s$1"; }

run() {  # run NAME SEED FLAGS...: skip a finished run, resume an unfinished one, stop where one fails
  local name=$1 seed=$2; shift 2
  local dir="$LOGS/$name" resume="" status=0
  if [ -f "$dir/log.txt" ] && [ "$(tail -n 1 "$dir/log.txt" | sed -n 's/.*"epoch": \([0-9]*\).*/\1/p')" = "$EPOCHS" ]; then
    echo "# done: $dir"; return 0
  fi
  [ -f "$dir/model.pt7" ] && resume="--resume auto"
  local cmd="$PYTHON cifar.py${CIFAR_FLAGS:+ $CIFAR_FLAGS} --dataroot $DATAROOT --epochs $EPOCHS --epoch_step '$EPOCH_STEP' --seed $seed --save $dir${resume:+ $resume} $*${EXTRA:+ $EXTRA}"
  echo "$cmd"
  [ "$DRY" = 1 ] && return 0
  eval "$cmd" || status=$?
  [ "$status" = 0 ] && return 0
  # 130/143: cifar.py was stopped by Ctrl-C or SIGTERM with its last whole epoch saved: stop here too.
  # Any other failure: cifar.py has said why in its one line.
  [ "$status" -gt 128 ] && echo "$PROG: interrupted in $dir (exit $status); run the same command again to resume: finished runs are skipped, $dir continues" >&2
  exit "$status"
}
