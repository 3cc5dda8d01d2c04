#!/usr/bin/env bash
# Issue 16's GPU check, one command: install the carried wheels, run benchmarks/gpu/checks.py
# under a hard time budget, and leave OUTDIR/gpu_check.json, gpu_check.log and gpu_check.md.
#
#   bash benchmarks/gpu/gpu_check.sh OUTDIR [--dry-run] [--budget SECONDS] [--only CHECK,...]
#
# --dry-run: on CPU, at tiny sizes, everything but what needs CUDA (the wheels, if collected,
# are only test-installed for Python 3.12). Exit status: 0 when every check passed or reported,
# 1 when one failed, errored, timed out, crashed or did not run, 2 on bad usage.
set -uo pipefail
usage() { echo "usage: $0 OUTDIR [--dry-run] [--budget SECONDS] [--only CHECK,...]" >&2; exit 2; }
[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || usage
OUTDIR=$1
shift
DRY=0 BUDGET="" ONLY=""
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --budget) [ $# -ge 2 ] || usage; BUDGET=$2; shift ;;
        --only) [ $# -ge 2 ] || usage; ONLY=$2; shift ;;
        *) usage ;;
    esac
    shift
done
START=$(date +%s)
# 8 minutes on the GPU, install included: the machine lends 15 in all, its start included.
[ -n "$BUDGET" ] || { [ $DRY = 1 ] && BUDGET=240 || BUDGET=480; }
DEADLINE=$((START + BUDGET))
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="${SEESAW_WHEELS:-$HERE/wheels}"
mkdir -p "$OUTDIR" && OUTDIR="$(cd "$OUTDIR" && pwd)" || exit 2

main() {
    echo "== gpu_check $(date -u +%FT%TZ): $([ $DRY = 1 ] && echo dry-run || echo gpu), budget ${BUDGET} s," \
         "commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
    "$PY" -c 'import sys; print("python", sys.version.split()[0], sys.executable)'
    [ $DRY = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
    df -h /dev/shm /tmp 2>/dev/null
    echo "cores: $(getconf _NPROCESSORS_ONLN)"

    SITE="$(mktemp -d "${TMPDIR:-/tmp}/seesaw-gpu-site.XXXXXX")"
    trap 'rm -rf "$SITE"' EXIT
    PIP=("$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --target "$SITE")
    if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
        echo "== install: $(ls "$WHEELS" | grep -c '\.whl$') wheels ($(du -sh "$WHEELS" | cut -f1)) from $WHEELS," \
             "built from $(cat "$WHEELS/SOURCE_COMMIT" 2>/dev/null || echo '?')"
        if [ $DRY = 1 ]; then
            # Not importable here (cp312 binaries): proves they install on the GPU machine's Python.
            timeout 120 "${PIP[@]}" --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
                --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
                "$WHEELS"/*.whl && echo "install for Python 3.12: ok"
        else
            timeout 120 "${PIP[@]}" "$WHEELS"/*.whl && echo "install: ok" && export PYTHONPATH="$SITE"
        fi
    else
        echo "== install: no wheels in $WHEELS (benchmarks/gpu/collect_wheels.sh makes them): packages as installed"
    fi
    # The working tree's seesaw_mc runs, ahead of the installed wheel.
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
    export PYTHONUNBUFFERED=1
    if [ $DRY = 0 ]; then
        export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/seesaw-torch-extensions}"
        # The 1B's master copy (4.4 GB in fp32) and a 1 GiB host tier go to /dev/shm; a small one
        # would refuse them.
        free_kb=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')
        if [ "${free_kb:-0}" -lt $((12 * 1024 * 1024)) ]; then
            export SEESAW_SHM_DIR=/tmp/seesaw-shm && mkdir -p "$SEESAW_SHM_DIR" && echo "SEESAW_SHM_DIR=$SEESAW_SHM_DIR"
        fi
    fi

    ARGS=(--out "$OUTDIR" --deadline "$DEADLINE")
    [ $DRY = 1 ] && ARGS+=(--dry-run)
    [ -n "$ONLY" ] && ARGS+=(--only "$ONLY")
    rm -f "$OUTDIR/gpu_check.json"
    RESUME=()
    for attempt in 1 2 3 4; do
        left=$((DEADLINE - $(date +%s)))
        [ $left -gt 15 ] || break
        timeout -k 10 $((left + 5)) "$PY" "$HERE/checks.py" "${ARGS[@]}" ${RESUME[@]+"${RESUME[@]}"}
        rc=$?
        case $rc in 0 | 1) break ;; esac
        # Killed by a crash or a lost CUDA context (exit 3): go on with the checks left.
        echo "== checks.py exited with $rc (attempt $attempt): starting again for the checks left"
        RESUME=(--resume)
    done
    "$PY" "$HERE/checks.py" "${ARGS[@]}" --finalize
    rc=$?
    "$PY" "$HERE/checks.py" --out "$OUTDIR" --table > "$OUTDIR/gpu_check.md"
    cat "$OUTDIR/gpu_check.md"
    echo "== gpu_check done in $(($(date +%s) - START)) s, exit $rc"
    return $rc
}

main 2>&1 | tee "$OUTDIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
