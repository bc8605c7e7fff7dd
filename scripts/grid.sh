# Sourced by table1.sh and cifar100.sh (imagenet.sh takes script_args and scaled_steps): the
# arguments, the settings checks, the scaled lr schedule and the grid of runs they share.
# The caller sets PROG, then LOGS, EPOCHS, EPOCH_STEP, SEEDS, TEACHER_SEEDS, PYTHON, EXTRA, CIFAR_FLAGS,
# and for run_grid: ROWS, ALL_ROWS, METHODS, and the NET, PAIR and METHOD arrays.

die() { echo "$PROG: error: $*" >&2; exit 2; }

script_args() {  # script_args "$@": --dry-run sets DRY=1, --help prints the script's header
  DRY=0
  local a
  for a in "$@"; do
    case "$a" in
      --dry-run) DRY=1 ;;
      -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 0 ;;
      *) die "unknown argument $a (try --help)" ;;
    esac
  done
}

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

pair_name() { echo "$1"; }  # a row's part of its runs' names; a script may say otherwise

run_grid() {  # run_grid ALL_METHODS: the teachers, then for each seed the students alone and each method of each row
  local all=$1 m row s st t teachers=() baselines=()
  for m in $METHODS; do [[ " $all " == *" $m "* ]] || die "unknown method $m ($all)"; done
  for row in $ROWS; do
    [ -n "${PAIR[$row]:-}" ] || die "unknown row $row ($ALL_ROWS)"
    read -r st t <<< "${PAIR[$row]}"
    [[ " ${teachers[*]} " == *" $t "* ]] || teachers+=("$t")
    [[ " ${baselines[*]} " == *" $st "* ]] || baselines+=("$st")
  done
  local t0=${TEACHER_SEEDS%% *}
  # cifar.py finds a bare --teacher_id under logs/; elsewhere the student is given the folder itself
  local tdir; tdir=$( [ "$LOGS" = logs ] && echo "" || echo "$LOGS/" )
  for t in "${teachers[@]}"; do
    for s in $TEACHER_SEEDS; do run "${t}_teacher$(suffix "$s")" "$s" "${NET[$t]}"; done
  done
  for s in $SEEDS; do
    if [[ " $METHODS " == *" student "* ]]; then
      for st in "${baselines[@]}"; do run "$st$(suffix "$s")" "$s" "${NET[$st]}"; done
    fi
    for row in $ROWS; do
      read -r st t <<< "${PAIR[$row]}"
      for m in $METHODS; do
        [ "$m" = student ] && continue
        run "${m}_$(pair_name "$row")$(suffix "$s")" "$s" "${NET[$st]} --teacher_id $tdir${t}_teacher$(suffix "$t0") ${METHOD[$m]}"
      done
    done
  done
}
