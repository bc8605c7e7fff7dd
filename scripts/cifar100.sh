#!/usr/bin/env bash
# The CIFAR-100 tables of RepDistiller (CRD, ICLR 2020), their AT and KD rows for all 13 pairs: the 7
# within one network family and the 6 across families. The teachers (ResNet50 too, with the same
# recipe), the students alone, then AT and KD for each pair, every run under cifar.py --preset crd
# (docs/cifar100.md; the preset gives MobileNetV2 and the ShuffleNets lr 0.01, as that code does).
# Finished runs are skipped, unfinished ones resumed; the first run that does not finish (an error, or
# a signal: exit 130/143) stops the script.
#
#   scripts/cifar100.sh [--dry-run]
#
# Environment (defaults in brackets; relative paths are taken from where you run the script):
#   DATAROOT [.]          CIFAR-100 (torchvision files, downloaded when missing, or a class-folder copy)
#   EPOCHS [240]          a short schedule scales EPOCH_STEP with it
#   EPOCH_STEP [the preset's [151,181,211], i.e. lr x 0.1 after epochs 150, 180, 210, scaled by
#                         EPOCHS/240, never below 2, each epoch after the one before]
#   SEEDS [0]             student seeds ("0 1 2"); TEACHER_SEEDS [0]: students learn from the first
#   PAIRS [all 13, student then teacher, as 2017 and RepDistiller name them: wrn_16_2_40_2
#         wrn_40_1_40_2 resnet20_56 resnet20_110 resnet32_110 resnet8x4_32x4 vgg8_13 MobileNetV2_vgg13
#         MobileNetV2_ResNet50 vgg8_ResNet50 ShuffleV1_resnet32x4 ShuffleV2_resnet32x4 ShuffleV1_wrn_40_2]
#         (ROWS, its earlier name, too)
#   METHODS [student at kd]   (teachers always run)
#   BETA [1e+3] ALPHA [0.9]   AT weight on every group output; KD weight (T = 4, cross-entropy 0.1)
#   LOGS [logs/cifar100]  PYTHON [python]  EXTRA ['']    EXTRA is added to every cifar.py command
#
# Then: python scripts/summarize.py logs/cifar100 --table cifar100 --out docs/results/cifar100
set -euo pipefail
CALLER=$(pwd -P)
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
PROG=cifar100.sh CIFAR_FLAGS="--preset crd"
. scripts/grid.sh
script_args "$@"
DATAROOT=$(from_caller "${DATAROOT:-.}")
EPOCHS=${EPOCHS:-240}
positive EPOCHS
EPOCH_STEP=${EPOCH_STEP:-$(scaled_steps "$EPOCHS" 240 1 150 180 210)}
SEEDS=${SEEDS:-0}
TEACHER_SEEDS=${TEACHER_SEEDS:-0}
ALL_ROWS="wrn_16_2_40_2 wrn_40_1_40_2 resnet20_56 resnet20_110 resnet32_110 resnet8x4_32x4 vgg8_13"  # same family
ALL_ROWS+=" MobileNetV2_vgg13 MobileNetV2_ResNet50 vgg8_ResNet50 ShuffleV1_resnet32x4 ShuffleV2_resnet32x4"
ALL_ROWS+=" ShuffleV1_wrn_40_2"  # across families
ROWS=${PAIRS:-${ROWS:-$ALL_ROWS}}
METHODS=${METHODS:-student at kd}
BETA=${BETA:-1e+3}; ALPHA=${ALPHA:-0.9}
LOGS=$(from_caller "${LOGS:-logs/cifar100}"); PYTHON=${PYTHON:-python}; EXTRA=${EXTRA:-}
check_settings BETA ALPHA

# name: model flags
declare -A NET=(
  [wrn_40_2]="--depth 40 --width 2" [wrn_16_2]="--depth 16 --width 2" [wrn_40_1]="--depth 40 --width 1"
  [resnet56]="--model resnet56" [resnet110]="--model resnet110" [resnet20]="--model resnet20"
  [resnet32]="--model resnet32" [resnet32x4]="--model resnet32x4" [resnet8x4]="--model resnet8x4"
  [vgg13]="--model vgg13" [vgg8]="--model vgg8" [ResNet50]="--model ResNet50"
  [MobileNetV2]="--model MobileNetV2" [ShuffleV1]="--model ShuffleV1" [ShuffleV2]="--model ShuffleV2"
)
# row: student teacher
declare -A PAIR=( [wrn_16_2_40_2]="wrn_16_2 wrn_40_2" [wrn_40_1_40_2]="wrn_40_1 wrn_40_2"
                  [resnet20_56]="resnet20 resnet56" [resnet20_110]="resnet20 resnet110"
                  [resnet32_110]="resnet32 resnet110" [resnet8x4_32x4]="resnet8x4 resnet32x4"
                  [vgg8_13]="vgg8 vgg13" [MobileNetV2_vgg13]="MobileNetV2 vgg13"
                  [MobileNetV2_ResNet50]="MobileNetV2 ResNet50" [vgg8_ResNet50]="vgg8 ResNet50"
                  [ShuffleV1_resnet32x4]="ShuffleV1 resnet32x4" [ShuffleV2_resnet32x4]="ShuffleV2 resnet32x4"
                  [ShuffleV1_wrn_40_2]="ShuffleV1 wrn_40_2" )
# AT on every group output with cross-entropy and no KD; KD with T = 4: 0.9 KL + 0.1 cross-entropy
declare -A METHOD=( [at]="--beta $BETA" [kd]="--alpha $ALPHA --temperature 4" )

run_grid "student at kd"
