#!/usr/bin/env bash
# Prepares what scripts/gpu_check.sh needs on a lent GPU machine that reaches no package index:
#   .wheelhouse/   torchnet 0.0.4 and visdom 0.2.4 (sdists: built here into py3-none-any wheels),
#                  hickle, and whatever those need that the machine's image lacks (tornado, jsonpatch,
#                  jsonpointer, websocket-client), as wheels for CPython 3.12 on manylinux x86_64
#   .gpu_check/    a copy of the CIFAR archive (../shared/data/cifar10-jpg.tar.gz), so it can be carried
# then checks every wheel's Requires-Dist against the image's package list and the wheelhouse, installs
# the wheelhouse into an empty --target with no index and imports torchnet, visdom and hickle from
# there, and prints the sizes: wheelhouse + data + the working tree that travels must stay under the
# tool's 64 MiB. (tensorboard is on the device image already: no wheel.)
#
#   bash scripts/make_wheelhouse.sh [--wheelhouse DIR] [--data-out DIR] [--archive FILE] [--no-data]
#
# Needs pip's configured index (for the sdists and wheels). The sdists are built in a venv of this
# script's own with setuptools<81 and wheel (visdom's setup.py imports pkg_resources; a bare system
# python3 may lack both). PYTHON (default .venv/bin/python, else python3) makes that venv, gives the
# versions to pin (what the tests ran with) and verifies the wheelhouse.
# On the machine: python3 -m pip install -q --no-index --no-deps --target /tmp/site .wheelhouse/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.wheelhouse DATA_OUT=.gpu_check ARCHIVE=../shared/data/cifar10-jpg.tar.gz COPY_DATA=1
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse|--data-out|--archive)
      [ $# -ge 2 ] || { echo "make_wheelhouse.sh: error: $1 needs a value" >&2; exit 2; }
      case "$1" in --wheelhouse) WHEELS=$2 ;; --data-out) DATA_OUT=$2 ;; *) ARCHIVE=$2 ;; esac; shift ;;
    --no-data) COPY_DATA=0 ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "make_wheelhouse.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$COPY_DATA" = 1 ] && [ ! -f "$ARCHIVE" ]; then  # before any fetching: say it at once
  echo "make_wheelhouse.sh: error: --archive $ARCHIVE: no such file (or pass --no-data)" >&2; exit 2
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PY=$PYTHON  # pins versions and verifies; BUILD (a venv made below) builds the sdists
LIMIT=$((64 * 1024 * 1024))
ARCHIVE_SHA256=3ea1817a5b9f11a1fcb080340309e34425232dc1237d530a035b46ea9b1fe8b8  # ../shared/data/README.md

# The device image's Python packages (.library/device/KINDS.md, "Python packages already there",
# as read on 2026-11-17); a requirement named here needs no wheel.
DEVICE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning
pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers
toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash
yarl zipp"

# the version this Python has installed (what the tests ran with), else the newest the constraint allows
pin() {
  local v
  v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null) \
    && echo "$1==$v" || echo "$1$2"
}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
rm -rf "$WHEELS"
mkdir -p "$WHEELS"
echo "== a build venv with setuptools<81 and wheel"
"$PY" -m venv "$TMP/build" || { echo "make_wheelhouse.sh: error: $PY cannot make a venv (python3-venv?)" >&2; exit 1; }
BUILD=$TMP/build/bin/python
"$BUILD" -m pip install -q 'setuptools>=70,<81' wheel
echo "== building torchnet and visdom from their sdists (no deps, no build isolation)"
"$BUILD" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir -w "$WHEELS" torchnet==0.0.4 visdom==0.2.4
PURE=("$(pin hickle '>=5.0')" "$(pin jsonpatch '')" "$(pin jsonpointer '')" "$(pin websocket-client '')" "$(pin tornado '')")
echo "== wheels for CPython 3.12, manylinux x86_64: ${PURE[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 --platform any \
  -d "$WHEELS" "${PURE[@]}"

echo "== requirements of each wheel, against the device image and the wheelhouse"
DEVICE_HAS=$DEVICE_HAS "$PY" - "$WHEELS" <<'EOF'
import os, re, sys, zipfile
folder = sys.argv[1]
norm = lambda n: re.sub(r'[-_.]+', '-', n).lower()
have = {norm(n) for n in os.environ['DEVICE_HAS'].split()}
wheels = sorted(f for f in os.listdir(folder) if f.endswith('.whl'))
ours = {norm(f.split('-')[0]) for f in wheels}
missing = []
for f in wheels:
    with zipfile.ZipFile(os.path.join(folder, f)) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith('.dist-info/METADATA'))).decode()
    reqs = [line.split(':', 1)[1].strip() for line in meta.splitlines() if line.startswith('Requires-Dist:')]
    reqs = [r for r in reqs if 'extra ==' not in r]
    names = [norm(re.match(r'[A-Za-z0-9_.-]+', r).group(0)) for r in reqs]
    where = ['in wheelhouse' if n in ours else 'on device' if n in have else 'MISSING' for n in names]
    missing += [n for n, w in zip(names, where) if w == 'MISSING']
    size = os.path.getsize(os.path.join(folder, f))
    print(f'{f} ({size / 1024:.0f} KiB): ' + (', '.join(f'{n} ({w})' for n, w in zip(names, where)) or 'no requirements'))
    if not (f.endswith('-none-any.whl') or ('abi3' in f and 'x86_64' in f) or 'cp312' in f):
        missing.append(f'{f}: not for CPython 3.12 on x86_64')
if missing:
    sys.exit('make_wheelhouse.sh: error: missing on the device: ' + ', '.join(sorted(set(missing))))
print(f'every requirement is on the device or in {folder}')
EOF

echo "== installing the wheelhouse into an empty --target with no index, and importing from there"
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$TMP/verify" "$WHEELS"/*.whl
PYTHONPATH="$TMP/verify" "$PY" - "$TMP/verify" <<'EOF'
import importlib, importlib.util, os, sys
target = os.path.realpath(sys.argv[1]) + os.sep
inside = lambda path: os.path.realpath(path).startswith(target)  # noqa: E731
imported, found = [], []
for name in ('torchnet', 'visdom', 'hickle'):
    spec = importlib.util.find_spec(name)
    if not spec or not inside(spec.origin):
        sys.exit(f'make_wheelhouse.sh: error: {name} is not in the wheelhouse install')
    try:
        m = importlib.import_module(name)
    except ModuleNotFoundError as e:  # a need of the device image (torch, numpy, PIL...) this Python lacks
        if e.name and os.path.exists(os.path.join(target, e.name.split('.')[0])):
            sys.exit(f'make_wheelhouse.sh: error: importing {name} from the wheelhouse install: {e}')
        found.append(f'{name} (not imported: this Python has no {e.name})')
        continue
    except Exception as e:
        sys.exit(f'make_wheelhouse.sh: error: importing {name} from the wheelhouse install: {type(e).__name__}: {e}')
    if not inside(m.__file__):
        sys.exit(f'make_wheelhouse.sh: error: {name} came from {m.__file__}, not the wheelhouse install')
    imported.append(name)
print('from the wheelhouse alone: imported ' + (', '.join(imported) or 'none') + ('; installed ' + ', '.join(found) if found else ''))
EOF

if [ "$COPY_DATA" = 1 ]; then
  echo "== copying $ARCHIVE to $DATA_OUT/"
  [ -f "$ARCHIVE" ] || { echo "make_wheelhouse.sh: error: no archive $ARCHIVE (--archive FILE, or --no-data)" >&2; exit 1; }
  mkdir -p "$DATA_OUT"
  cp "$ARCHIVE" "$DATA_OUT/cifar10-jpg.tar.gz"
  sum=$(sha256sum "$DATA_OUT/cifar10-jpg.tar.gz" | cut -d' ' -f1)
  if [ "$(basename "$ARCHIVE")" = cifar10-jpg.tar.gz ] && [ "$sum" != "$ARCHIVE_SHA256" ]; then
    echo "make_wheelhouse.sh: warning: $ARCHIVE's sha256 is $sum, not the README's $ARCHIVE_SHA256" >&2
  fi
fi

# what travels: tracked and untracked-not-ignored files, plus the carried folders
bytes() { du -sb "$@" 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
w=$(bytes "$WHEELS")
d=$([ "$COPY_DATA" = 1 ] && bytes "$DATA_OUT" || echo 0)
if git rev-parse --git-dir > /dev/null 2>&1; then
  t=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
else
  t=$(bytes --exclude=.git --exclude=.venv --exclude="$WHEELS" --exclude="$DATA_OUT" .)
fi
total=$((w + d + t))
mib() { awk -v b="$1" 'BEGIN {printf "%.2f MiB", b / 1048576}'; }
echo "== sizes: wheelhouse $(mib "$w") ($(ls "$WHEELS" | wc -l) wheels), data $(mib "$d"), tree $(mib "$t"); total $(mib "$total") of 64 MiB"
if [ "$total" -gt "$LIMIT" ]; then
  echo "make_wheelhouse.sh: error: $(mib "$total") would not travel (64 MiB at most)" >&2
  exit 1
fi
echo "carry: [\"$WHEELS\", \"$DATA_OUT\"]"
