# Sourced by table1.sh and cifar100.sh (imagenet.sh takes script_args, positive, scaled_steps, from_caller
# and run_status): the arguments, the settings checks, the scaled lr schedule, whether a run is done, and
# the grid of runs they share.
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

positive() {  # positive NAME...: each variable a whole number from 1 on, written plainly (010 is octal
  # to bash and 10 to Python: refused, not guessed)
  local v
  for v in "$@"; do [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive whole number, got '${!v}'"; done
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
  # epochs, rounded half up, plus OFFSET, never below 2 (the lr drops at the start of each listed
  # epoch, so 1 would skip the full lr) and each after the one before: distinct epochs, each a drop
  local epochs=$1 base=$2 offset=$3 s n prev=1 out=()
  shift 3
  for s in "$@"; do
    n=$(( (2 * s * epochs + base) / (2 * base) + offset ))
    (( n <= prev )) && n=$(( prev + 1 ))
    out+=("$n"); prev=$n
  done
  echo "[$(IFS=,; echo "${out[*]}")]"
}

# a path as the caller meant it, usable from the repository root where the commands run (the caller
# sets CALLER to where it was started and ROOT to the repository root)
from_caller() { case "$1" in /*|'') echo "$1" ;; *) [ "$CALLER" = "$ROOT" ] && echo "$1" || echo "$CALLER/$1" ;; esac; }

shown() {  # shown ARG...: the command line, each argument quoted where the shell would split or expand it
  local a out=()
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=+,@%-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

run_status() {  # run_status DIR: new, resume, done, or other<TAB>the schedule it finished (rundir.py decides)
  "$PYTHON" -m training.rundir status "$1" "$EPOCHS" "$EPOCH_STEP" || exit $?
}

suffix() { [ "$1" = 0 ] && echo "" || echo "_s$1"; }

run() {  # run NAME SEED ARG...: skip a finished run, resume an unfinished one, stop where one fails
  local name=$1 seed=$2; shift 2
  local dir="$LOGS/$name" state status=0
  state=$(run_status "$dir")
  case "$state" in
    done) echo "# done: $dir"; return 0 ;;
    other*) echo "$PROG: $dir finished under another schedule (${state#*$'\t'}), not this one (epochs $EPOCHS, epoch_step $EPOCH_STEP): not resumed; move it away to train it again" >&2
            return 0 ;;
  esac
  # CIFAR_FLAGS, a NET's and a METHOD's flags and EXTRA are words; every path and value is one argument
  # shellcheck disable=SC2206
  local cmd=("$PYTHON" cifar.py $CIFAR_FLAGS --dataroot "$DATAROOT" --epochs "$EPOCHS" --epoch_step "$EPOCH_STEP"
             --seed "$seed" --save "$dir")
  [ "$state" = resume ] && cmd+=(--resume auto)
  # shellcheck disable=SC2206
  cmd+=("$@" $EXTRA)
  shown "${cmd[@]}"
  [ "$DRY" = 1 ] && return 0
  "${cmd[@]}" || status=$?
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
    # shellcheck disable=SC2086
    for s in $TEACHER_SEEDS; do run "${t}_teacher$(suffix "$s")" "$s" ${NET[$t]}; done
  done
  for s in $SEEDS; do
    if [[ " $METHODS " == *" student "* ]]; then
      # shellcheck disable=SC2086
      for st in "${baselines[@]}"; do run "$st$(suffix "$s")" "$s" ${NET[$st]}; done
    fi
    for row in $ROWS; do
      read -r st t <<< "${PAIR[$row]}"
      for m in $METHODS; do
        [ "$m" = student ] && continue
        # shellcheck disable=SC2086
        run "${m}_$(pair_name "$row")$(suffix "$s")" "$s" ${NET[$st]} --teacher_id "$tdir${t}_teacher$(suffix "$t0")" ${METHOD[$m]}
      done
    done
  done
}
