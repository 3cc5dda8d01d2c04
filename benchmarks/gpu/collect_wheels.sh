#!/usr/bin/env bash
# Collect the wheels the GPU machine lacks into benchmarks/gpu/wheels/ (ignored by git), for
# the device tool's `carry`: at most 64 MiB travel with the working tree, wheels included.
#
# The machine has Python 3.12, torch 2.11 (CUDA 13), transformers, triton, einops, numpy,
# packaging, psutil, py-cpuinfo, msgpack, ninja and tqdm, and no registry. It lacks:
#   - megatron-core 0.16.1: a cp312 manylinux_2_28 wheel (2.6 MB); not pure Python (one
#     compiled helper for Megatron's datasets, which we never import), so it must be cp312;
#   - deepspeed 0.19.8: sdist only on PyPI, built here with DS_BUILD_OPS=0 (a pure-Python
#     wheel: its CUDA ops JIT-build with the machine's nvcc on first use);
#   - deepspeed's pydantic (+ pydantic-core, a cp312 binary, annotated-types,
#     typing-inspection, typing_extensions) and hjson;
#   - seesaw-mc itself (gpu_check.sh still runs the working tree's code, first on sys.path).
# Versions come from constraints.txt, the project's tested pins.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
OUT="${1:-$HERE/wheels}"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
LIMIT_MIB=48  # of the 64 MiB a call may carry; the rest is the working tree

# pip matches manylinux tags exactly: list the ones these wheels use.
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
BINARY=(megatron-core pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson)

pip_() {  # this machine's pip config lists local indexes that may be absent: drop those warnings
    "$PY" -m pip "$@" --disable-pip-version-check 2> >(grep -v 'is ignored: it is neither' >&2)
}

rm -rf "$OUT"
mkdir -p "$OUT"
echo "downloading ${BINARY[*]} (cp312, manylinux x86_64)"
pip_ download -q --no-deps "${PLATFORM[@]}" -c "$REPO/constraints.txt" \
    -d "$OUT" "${BINARY[@]}"
echo "building deepspeed with DS_BUILD_OPS=0"
DS_BUILD_OPS=0 pip_ wheel -q --no-deps --no-build-isolation \
    -c "$REPO/constraints.txt" -w "$OUT" deepspeed
echo "building seesaw-mc from $REPO"
BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT
# Built from a copy: setuptools writes build/ and *.egg-info into the source tree.
git -C "$REPO" ls-files -z | (cd "$REPO" && xargs -0 cp --parents -t "$BUILD")
pip_ wheel -q --no-deps --no-build-isolation -w "$OUT" "$BUILD"
git -C "$REPO" rev-parse HEAD > "$OUT/SOURCE_COMMIT"

# One version of each package: two stop the whole install on the GPU machine.
dups=$(ls "$OUT"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dups" ] || { echo "two versions of: $dups" >&2; exit 1; }
# The deepspeed wheel must carry the kernel sources its JIT build compiles.
"$PY" -m zipfile -l "$OUT"/deepspeed-*.whl > "$BUILD/deepspeed.files"
grep -q "core_ops/cuda_rms_norm/rms_norm_cuda.cu" "$BUILD/deepspeed.files" \
    || { echo "the deepspeed wheel lacks its CUDA sources" >&2; exit 1; }
ls -l "$OUT"
total=$(du -sm "$OUT" | cut -f1)
echo "total: ${total} MiB (limit ${LIMIT_MIB} MiB)"
[ "$total" -le "$LIMIT_MIB" ] || { echo "wheels exceed ${LIMIT_MIB} MiB" >&2; exit 1; }
