#!/usr/bin/env bash
# The paper's ImageNet row in one command: export and evaluate the ResNet-34 teacher, train
# ResNet-18 alone and with attention transfer (AT) from it, evaluate both, and write the table
# (top-1/top-5 val error, ours beside the paper's) to $LOGS/imagenet_table.md.
# Done steps are skipped and unfinished runs resumed, so rerun the same command after a stop.
#
#   IMAGENETPATH=~/ILSVRC2012 scripts/imagenet.sh [--dry-run]
#
# Environment (defaults in brackets; relative paths are taken from where you run the script):
#   IMAGENETPATH [required]  a folder with train/ and val/ in ImageFolder layout
#   LOGS [logs]              the teacher export, the runs r18/ and at_r18_r34/, the table
#   EPOCHS [100]             a short schedule scales EPOCH_STEP with it
#   EPOCH_STEP [the 2017 [30,60,90], scaled by EPOCHS/100, never below 2: the lr drops at
#                            the start of each listed epoch, so 1 would skip the full lr; each
#                            epoch after the one before]
#   BATCH [256]              the global batch, whatever LAUNCH
#   NTHREAD ['']             data loader workers per process (default: imagenet.py's, the CPUs
#                            each process may use; 2017: 4)
#   BETA [2e+3]              AT weight. The 2017 command (--ngpu 2 --beta 1e+3) summed one AT loss
#                            per GPU, so it weighed the batch-mean AT loss by 2e+3; here --beta
#                            weighs the mean over the whole batch whatever the device count.
#   TEACHER_WEIGHTS ['']     a local torchvision resnet34 state_dict (e.g. resnet34-b627a593.pth),
#                            for offline use; unset, torchvision's weights are downloaded
#   LAUNCH [single]          how training runs: single (one process), torchrun:N (N processes,
#                            one GPU each), ngpu:N (one process, DataParallel over GPUs 0..N-1);
#                            evaluations always run as one process
#   EXTRA ['']               added to every imagenet.py command, e.g. --no_progress
#   PYTHON [python]
# Delete $LOGS/resnet-34-export.pth to export the teacher again, or a run's eval.txt to evaluate
# it again (a run whose model.pt7 is newer than its eval.txt is evaluated again by itself).
set -euo pipefail
PROG=imagenet.sh
. "$(dirname "$0")/grid.sh"  # die, script_args, positive, scaled_steps, from_caller, run_status
script_args "$@"
CALLER=$(pwd -P)
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }
q() { printf '%q' "$1"; }  # a path inside a printed command

[ -n "${IMAGENETPATH:-}" ] || die "set IMAGENETPATH to a folder with train/ and val/ in ImageFolder layout"
IMAGENETPATH=$(from_caller "$IMAGENETPATH")
[ -d "$IMAGENETPATH" ] || die "IMAGENETPATH=$IMAGENETPATH is not a folder"
for split in train val; do
  [ -d "$IMAGENETPATH/$split" ] || die "IMAGENETPATH=$IMAGENETPATH has no $split/ folder (ImageFolder layout: $split/<class>/*.JPEG)"
done
LOGS=$(from_caller "${LOGS:-logs}")
EPOCHS=${EPOCHS:-100}
positive EPOCHS
EPOCH_STEP=${EPOCH_STEP:-$(scaled_steps "$EPOCHS" 100 0 30 60 90)}
[[ "$EPOCH_STEP" =~ ^\[\ *([1-9][0-9]*\ *(,\ *[1-9][0-9]*\ *)*)?\]$ ]] ||
  die "EPOCH_STEP must be a JSON list of epochs from 1 on, like [30,60,90]; got '$EPOCH_STEP'"
BATCH=${BATCH:-256}
positive BATCH
NTHREAD=${NTHREAD:-}
if [ -n "$NTHREAD" ]; then
  is_int "$NTHREAD" || die "NTHREAD must be a whole number, got '$NTHREAD'"
  NTHREAD=" --nthread $((10#$NTHREAD))"
fi
BETA=${BETA:-2e+3}
[[ "$BETA" =~ ^[+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$ ]] || die "BETA must be a number like 2e+3, got '$BETA'"
TEACHER_WEIGHTS=$(from_caller "${TEACHER_WEIGHTS:-}")
if [ -n "$TEACHER_WEIGHTS" ] && [ ! -f "$TEACHER_WEIGHTS" ]; then
  die "TEACHER_WEIGHTS=$TEACHER_WEIGHTS: no such file (a torchvision resnet34 state_dict)"
fi
EXTRA=${EXTRA:-}
PYTHON=${PYTHON:-python}
command -v "$PYTHON" > /dev/null || die "PYTHON=$PYTHON: command not found (activate the project's venv)"
LAUNCH=${LAUNCH:-single}
TRAIN="$PYTHON imagenet.py"; GPUS=""
case "$LAUNCH" in
  single) ;;
  torchrun:*|ngpu:*)
    n=${LAUNCH#*:}
    { is_int "$n" && [ "$n" -ge 1 ]; } || die "LAUNCH=$LAUNCH: N must be a whole number of at least 1"
    n=$((10#$n))
    if [ "${LAUNCH%%:*}" = torchrun ]; then
      TRAIN="$PYTHON -m torch.distributed.run --standalone --nproc_per_node $n imagenet.py"
    else
      GPUS=" --ngpu $n --gpu_id $(seq -s, 0 $((n - 1)))"
    fi ;;
  *) die "LAUNCH=$LAUNCH: use single, torchrun:N or ngpu:N" ;;
esac
EVAL="$PYTHON imagenet.py --imagenetpath $(q "$IMAGENETPATH")"
EXPORT="$LOGS/resnet-34-export.pth"
TEACHER_EVAL="$LOGS/resnet-34-export.eval.txt"
R18="$LOGS/r18"; AT="$LOGS/at_r18_r34"
TABLE="$LOGS/imagenet_table.md"

execute() {  # execute CMD: print it; run it unless --dry-run; a failure stops here with its status
  echo "$1"
  [ "$DRY" = 1 ] && return 0
  local status=0
  eval "$1" || status=$?
  [ "$status" = 0 ] && return 0
  # 130/143: a run stopped by Ctrl-C or SIGTERM, its last whole epoch saved; stop here too
  [ "$status" -gt 128 ] && echo "imagenet.sh: interrupted (exit $status); run the same command again to resume: finished steps are skipped, the interrupted run continues" >&2
  exit "$status"
}

export_teacher() {
  local src="torchvision:resnet34${TEACHER_WEIGHTS:+:$TEACHER_WEIGHTS}" part="${EXPORT%.pth}.part.pth"
  if [ -f "$EXPORT" ]; then echo "# skip: $EXPORT exists"; return 0; fi
  local cmd="$PYTHON scripts/convert_teacher.py $(q "$src") $(q "$part") && mv $(q "$part") $(q "$EXPORT")"
  echo "$cmd"
  [ "$DRY" = 1 ] && return 0
  mkdir -p "$LOGS" 2> /dev/null || die "LOGS=$LOGS: cannot create that folder"
  # convert_teacher.py says what went wrong in one line; it is said here again, as this script's one line
  local err status=0
  { err=$(eval "$cmd" 2>&1 1>&3 3>&-) || status=$?; } 3>&1
  if [ "$status" != 0 ]; then
    rm -f "$part"
    err=$(printf '%s\n' "$err" | grep -v '^[[:space:]]*$' | tail -n 1)
    err=${err#convert_teacher.py: error: }
    if [ -z "$TEACHER_WEIGHTS" ] && [[ "$err" == *"cannot download"* ]]; then
      die "cannot download torchvision's ResNet-34 weights; offline, set TEACHER_WEIGHTS=/path/to/resnet34-b627a593.pth (a torchvision state_dict)"
    fi
    die "teacher export failed: ${err:-convert_teacher.py exited with status $status}"
  fi
  [ -z "$err" ] || printf '%s\n' "$err" >&2
}

evaluate() {  # evaluate OUT NEWER_THAN FLAGS: the evaluation's output kept in OUT, redone when stale
  local out=$1 source=$2 flags=$3
  if [ -f "$out" ] && [ ! "$source" -nt "$out" ] && grep -q 'top-1 error' "$out"; then
    echo "# skip: $out is done: $(grep 'top-1 error' "$out" | tail -n 1)"; return 0
  fi
  execute "$EVAL $flags --batch_size $BATCH$NTHREAD${EXTRA:+ $EXTRA} | tee $(q "$out.part") && mv $(q "$out.part") $(q "$out")"
}

logged_epochs() { if [ -f "$1/log.txt" ]; then grep -c '^json_stats: ' "$1/log.txt" || true; else echo 0; fi; }

train() {  # train DIR FLAGS: skip a finished run, resume an unfinished one, report one of another schedule
  local dir=$1 flags=$2 state resume=""
  state=$(run_status "$dir")
  case "$state" in
    done) echo "# skip: $dir is done ($(logged_epochs "$dir") of $EPOCHS epochs logged)"; return 0 ;;
    other*) echo "imagenet.sh: $dir finished under another schedule (${state#*$'\t'}), not this one (epochs $EPOCHS, epoch_step $EPOCH_STEP): not resumed; move it away to train it again" >&2
            return 0 ;;
    resume) resume=" --resume auto" ;;
  esac
  execute "$TRAIN --imagenetpath $(q "$IMAGENETPATH") --depth 18 --width 1$flags --epochs $EPOCHS --epoch_step '$EPOCH_STEP' --batch_size $BATCH$NTHREAD$GPUS --save $(q "$dir")$resume${EXTRA:+ $EXTRA}"
}

export_teacher
evaluate "$TEACHER_EVAL" "$EXPORT" "--evaluate $(q "$EXPORT")"
train "$R18" ""
train "$AT" " --teacher_params $(q "$EXPORT") --beta $BETA"
for dir in "$R18" "$AT"; do
  evaluate "$dir/eval.txt" "$dir/model.pt7" "--depth 18 --width 1 --evaluate --resume $(q "$dir/model.pt7")"
done

echo "$PYTHON - $(q "$TABLE") $(q "$LOGS") $EPOCHS $BETA <<'EOF'  # the summary table, inline in scripts/imagenet.sh"
[ "$DRY" = 1 ] && exit 0
"$PYTHON" - "$TABLE" "$LOGS" "$EPOCHS" "$BETA" <<'EOF'
"""Writes the table of ours beside the paper's top-1/top-5 error; a missing cell is a dash."""
import os
import re
import sys

table, logs, epochs, beta = sys.argv[1:]
LINE = re.compile(r'top-1 error ([0-9.]+)%, top-5 error ([0-9.]+)% on ([0-9]+) images')


def result(out, model=None):
    """(top-1, top-5, images) from an evaluation's output; None when missing or older than the model."""
    if not os.path.isfile(out) or (model and os.path.isfile(model) and os.path.getmtime(model) > os.path.getmtime(out)):
        return None
    found = LINE.findall(open(out).read())
    return tuple(float(x) for x in found[-1]) if found else None


def logged(run):
    path = os.path.join(run, 'log.txt')
    return sum(line.startswith('json_stats: ') for line in open(path)) if os.path.isfile(path) else 0


rows = [  # name, evaluation output, model, run folder, paper top-1, top-5
    ('ResNet-34 teacher', os.path.join(logs, 'resnet-34-export.eval.txt'), os.path.join(logs, 'resnet-34-export.pth'),
     None, 26.1, 8.3),
    ('ResNet-18', os.path.join(logs, 'r18', 'eval.txt'), os.path.join(logs, 'r18', 'model.pt7'),
     os.path.join(logs, 'r18'), 30.4, 10.8),
    (f'ResNet-18 + AT (beta {beta})', os.path.join(logs, 'at_r18_r34', 'eval.txt'),
     os.path.join(logs, 'at_r18_r34', 'model.pt7'), os.path.join(logs, 'at_r18_r34'), 29.3, 10.0),
]
DASH = '—'
lines = ['| network | epochs | top-1 error, ours | paper | top-5 error, ours | paper |',
         '|---|---|---|---|---|---|']
images = set()
for name, out, model, run, p1, p5 in rows:
    r = result(out, model)
    if r:
        images.add(int(r[2]))
    ours = (f'{r[0]:.2f}', f'{r[1]:.2f}') if r else (DASH, DASH)
    done = 'n/a' if run is None else f'{logged(run)}/{epochs}'
    lines.append(f'| {name} | {done} | {ours[0]} | {p1} | {ours[1]} | {p5} |')
size = ', '.join(f'{n:,}' for n in sorted(images)) or DASH
text = (f'ImageNet val error (%): ours on {size} images, the paper on ILSVRC2012 val (50,000 images) after 100 '
        f'epochs; the paper\'s teacher figure is third-party. {DASH}: not run yet.\n\n' + '\n'.join(lines) + '\n')
with open(table, 'w') as fh:
    fh.write(text)
print(text, end='')
print(f'(written to {table})')
EOF
