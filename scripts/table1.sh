#!/usr/bin/env bash
# Every cell of the paper's CIFAR-10 Table 1: the 4 teachers, the student baselines, then for each
# of the 4 pairs AT, F-ActT, KD and AT+KD. Finished runs are skipped, unfinished ones resumed, and
# one finished under another schedule is reported, not resumed.
#
#   scripts/table1.sh [--dry-run]
#
# Environment (defaults in brackets; relative paths are taken from where you run the script):
#   DATAROOT [.]          CIFAR-10 (torchvision files, or a class-folder dataset)
#   EPOCHS [200]          a short schedule scales EPOCH_STEP with it
#   EPOCH_STEP [the 2017 [60,120,160], scaled by EPOCHS/200, never below 2: the lr drops at
#                         the start of each listed epoch, so 1 would skip the full lr; each
#                         epoch after the one before]
#   SEEDS [0]             student seeds ("0 1 2"); the paper reports medians
#   TEACHER_SEEDS [0]     teachers are trained once per seed here; students use the first
#   ROWS [nin 16_1_16_2 16_1_40_1 16_2_40_2]
#   METHODS [student at factt kd atkd]   (teachers always run; add gradat for gradient-based
#                         AT, paper section 3.2, which is not a Table 1 column)
#   BETA [1e+3] ALPHA [0.9] FACTT_BETA [1e+4] GRAD_BETA [1e+3]   transfer weights
#   LOGS [logs]  PYTHON [python]  EXTRA ['']    EXTRA is added to every cifar.py command
set -euo pipefail
CALLER=$(pwd -P)
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
PROG=table1.sh CIFAR_FLAGS=
. scripts/grid.sh
script_args "$@"
DATAROOT=$(from_caller "${DATAROOT:-.}")
EPOCHS=${EPOCHS:-200}
positive EPOCHS
EPOCH_STEP=${EPOCH_STEP:-$(scaled_steps "$EPOCHS" 200 0 60 120 160)}
SEEDS=${SEEDS:-0}
TEACHER_SEEDS=${TEACHER_SEEDS:-0}
ALL_ROWS="nin 16_1_16_2 16_1_40_1 16_2_40_2"
ROWS=${ROWS:-$ALL_ROWS}
METHODS=${METHODS:-student at factt kd atkd}
BETA=${BETA:-1e+3}; ALPHA=${ALPHA:-0.9}; FACTT_BETA=${FACTT_BETA:-1e+4}; GRAD_BETA=${GRAD_BETA:-1e+3}
LOGS=$(from_caller "${LOGS:-logs}"); PYTHON=${PYTHON:-python}; EXTRA=${EXTRA:-}
check_settings BETA ALPHA FACTT_BETA GRAD_BETA

# name: model flags
declare -A NET=(
  [resnet_16_1]="--depth 16 --width 1" [resnet_16_2]="--depth 16 --width 2"
  [resnet_40_1]="--depth 40 --width 1" [resnet_40_2]="--depth 40 --width 2"
  [nin_thin]="--model nin --width 0.45" [nin_wide]="--model nin --width 1"
)
# row: student teacher
declare -A PAIR=( [nin]="nin_thin nin_wide" [16_1_16_2]="resnet_16_1 resnet_16_2"
                  [16_1_40_1]="resnet_16_1 resnet_40_1" [16_2_40_2]="resnet_16_2 resnet_40_2" )
declare -A METHOD=( [at]="--beta $BETA" [factt]="--factt_beta $FACTT_BETA" [kd]="--alpha $ALPHA"
                    [atkd]="--beta $BETA --alpha $ALPHA --beta_decay step" [gradat]="--grad_beta $GRAD_BETA" )

pair_name() { [ "$1" = nin ] && echo nin_thin_nin_wide || echo "$1"; }
run_grid "student at factt kd atkd gradat"
