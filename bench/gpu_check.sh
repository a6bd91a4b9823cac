#!/usr/bin/env bash
# The prepared GPU run: every figure that needs a CUDA GPU, measured in one command on one H100/H200 in under
# 8 minutes, written to bench/gpu_results/<date>-<device>.json and .md (what each section measures: the
# docstring of bench/gpu_check.py).
#
#   bash bench/gpu_check.sh                       # everything, most important first
#   bash bench/gpu_check.sh --only compile        # one section again (names: bench/gpu_check.py)
#
# Python: $PYTHON, else python3, with the machine's own torch (CUDA; 2.11 or newer), transformers, accelerate,
# safetensors and numpy. Nothing is downloaded: the other packages come as wheels in .whl/ at the repository root,
# unpacked into a private folder for this run only (no pip needed). Wheels it needs:
#   diffusers==0.42.1  importlib_metadata  zipp  (diffusers 0.42.1 asks for huggingface_hub >= 1.32: carry that
#                                               too if the machine's is older, with transformers >= 5 to match)
#   ftfy==6.3.1  wcwidth  pillow  regex  filelock  requests        (pillow, regex, filelock, requests if absent)
#   pytest  pluggy  iniconfig  packaging                            (for the GPU-marked tests)
#   imageio  imageio-ffmpeg  scipy  trimesh                         (optional: the scene-level GPU tests write
#                                                                    videos and clouds; without them those report
#                                                                    an import error and the rest still runs)
# Fetch them on a machine with network access (same Python version and platform as the GPU machine, or add
# --only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.X):
#   pip download --no-deps -d .whl diffusers==0.42.1 importlib_metadata zipp \
#       ftfy==6.3.1 wcwidth pillow regex filelock requests pytest pluggy iniconfig packaging \
#       imageio imageio-ffmpeg scipy trimesh
# leaving out what the GPU machine already has.
#
# On a machine without CUDA (or without torch) it prints what it would run, says that nothing was measured and
# exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "bench/gpu_check: $PY not found. Nothing was measured; set PYTHON to a python with torch."
    exit 0
fi
SITE="$(mktemp -d)"
trap 'rm -rf "$SITE"' EXIT
shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
    # A wheel is a zip of what site-packages holds: unpacking it (executable bits kept, for imageio-ffmpeg's
    # ffmpeg) installs it for this run.
    "$PY" - "$SITE" "${wheels[@]}" <<'UNPACK'
import os, sys, zipfile
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            path = zf.extract(info, sys.argv[1])
            if (info.external_attr >> 16) & 0o111:
                os.chmod(path, (info.external_attr >> 16) & 0o777)
UNPACK
    echo "bench/gpu_check: ${#wheels[@]} wheel(s) from .whl/ on the path for this run"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" bench/gpu_check.py "$@"
