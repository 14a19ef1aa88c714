#!/usr/bin/env bash
# Build a wheelhouse for running this project on an offline x86-64 Linux GPU machine whose
# Python 3.12 already has torch/torchvision/torchaudio, numpy, pandas, pyarrow, scikit-learn,
# onnx, onnxruntime (e.g. a CUDA image): every other requirement, with its dependencies.
# usage (from the project root, on a machine that reaches the package index):
#   make wheelhouse      (= tools/offline/offline-wheelhouse.sh .whl)
# then on the offline machine, from the project root:
#   bash .whl/run-offline.sh            # installs the wheels to /tmp/site and runs `dvc repro`
# OUT (.whl/) is git-ignored. `make wheelhouse` then checks it fits a GPU loan (carry_size.py: 64 MiB).
set -euo pipefail
OUT=${1:-.whl}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"; TMP=$(mktemp -d)
# the machine's image already holds these (and their own deps): do not carry them
HAVE='^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*|numpy|pandas|pyarrow|scipy|scikit-learn|joblib|threadpoolctl|onnx|onnxruntime|onnxscript|onnx-ir|ml-dtypes|pillow|pyyaml|fsspec|tqdm|safetensors|psutil|nvidia-ml-py|numba|llvmlite|msgpack|lazy-loader|packaging|typing-extensions|jinja2|markupsafe|requests|urllib3|idna|certifi|charset-normalizer|six|python-dateutil|pytz|tzdata|protobuf|sympy|mpmath|networkx|filelock|setuptools|attrs|click|rich|pygments|markdown-it-py|mdurl|matplotlib|contourpy|cycler|fonttools|kiwisolver|pyparsing|pytest|pluggy|iniconfig|flatbuffers|coloredlogs|humanfriendly|werkzeug|markdown|grpcio|anyio|h11|httpx|httpcore|sniffio|pyarrow-hotfix|zipp|platformdirs|aiohttp|aiohappyeyeballs|aiosignal|frozenlist|multidict|propcache|yarl|narwhals|pathspec|colorama|cloudpickle|annotated-doc|uvloop|tabulate)$'
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64"
# hydra-core (a dvc dependency) needs antlr4-python3-runtime, published as a source archive only
python3 -m pip wheel -q --no-deps -w "$TMP" antlr4-python3-runtime==4.9.3
grep -vE '^\s*(#|$)' requirements.txt | sed 's/#.*//' | grep -viE '^(torch|torchvision|torchaudio)==' > "$TMP/req.txt"
# and the extras a GPU run may use: [tune], librosa (the benchmarks' naive baseline); not the test tools. [text]
# (transformers, tokenizers and the hub client: ~22 MB) only with WITH_TEXT=1: with it the wheels no longer fit
# the 64 MiB a lent GPU machine carries (carry_size.py), and bench/gpu_run.sh does not need it
EXTRAS='optuna|librosa'
[ "${WITH_TEXT:-0}" = 1 ] && EXTRAS="$EXTRAS|transformers|tokenizers"
grep -iE "^($EXTRAS)==" requirements-dev.txt | sed 's/#.*//' >> "$TMP/req.txt"
grep -viE '^(torch|torchvision|torchaudio|triton|nvidia-)' constraints.txt > "$TMP/con.txt" 2>/dev/null || true
python3 -m pip download -q $PLAT --find-links "$TMP" -d "$TMP" -r "$TMP/req.txt" -c "$TMP/con.txt"
for f in "$TMP"/*.whl; do
  n=$(basename "$f" | cut -d- -f1 | tr 'A-Z_' 'a-z-')
  echo "$n" | grep -qE "$HAVE" || cp "$f" "$OUT/"
done
cp "$HERE/run-offline.sh" "$OUT/"
rm -rf "$TMP"
echo "$OUT: $(ls "$OUT"/*.whl | wc -l) wheels, $(du -sh "$OUT" | cut -f1)"
