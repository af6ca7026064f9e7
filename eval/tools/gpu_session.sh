#!/usr/bin/env bash
# What waits for a lent GPU (kernels/NOTES.md, "Pending"), in device calls of under ten
# minutes each:
#
#   bash eval/tools/gpu_session.sh "$OUT" kernels [LABEL...]  # tests and kernel benchmark
#   bash eval/tools/gpu_session.sh "$OUT" decode               # decode tokens/s of the 7B-shaped stack
#
# LABELs pick which trees the kernels phase measures: main, and the pending patches' names
# (v7-cp-async-ring, ...); all of them by default. Each tree compiles its eight variants on
# first use (about 15 s each; the v9 tree builds for sm_90a, its 256-token wgmma kernel alone
# 12 s in ptxas), so one call cannot measure all four trees in ten minutes: run
# `kernels main v7-cp-async-ring`, then `kernels v8-tiled-gemm v9-wgmma` (or v9-wgmma alone if
# v8's call ran long), then `decode`.
#
# kernels: the GPU tests of the tree as it is (the kernels, and `--device auto` in
#   tests/test_placement.py), the kernel benchmark at 8192^2 with the split-K, branch-item and
#   dispatch sweeps; then, for each kernels/pending/*.patch applied in order on top of the ones
#   before it in a copy of the tree, the same kernel tests and benchmark, so each change is timed
#   on the same machine in the same call as what it would replace.
# decode: eval/bench_decode.py for the tree, and for the copy with every pending patch.
#
# Every step writes its output to OUTPUT_FOLDER/STEP.txt and the script goes on past a failing
# step, so one call brings back everything that could be measured. Exit status: the number of
# failed steps.
set -uo pipefail
out=${1:?usage: gpu_session.sh OUTPUT_FOLDER kernels|decode}
phase=${2:?usage: gpu_session.sh OUTPUT_FOLDER kernels|decode}
shift 2
wanted=" ${*:-all} "
mkdir -p "$out"
root=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-python3}
failed=0

step() {  # step NAME DIRECTORY COMMAND...: run COMMAND in DIRECTORY, its output to $out/NAME.txt
    local name=$1 directory=$2
    shift 2
    echo "== $name: $*"
    if (cd "$directory" && PYTHONPATH="$directory:$directory/eval" "$@") >"$out/$name.txt" 2>&1; then
        tail -n 3 "$out/$name.txt"
    else
        echo "   FAILED (exit $?), see $name.txt:"
        tail -n 15 "$out/$name.txt"
        failed=$((failed + 1))
    fi
}

apply_patch() {  # apply_patch PATCH: in the current directory (git may be missing on the GPU machine)
    if command -v git >/dev/null; then
        git apply "$1"
    else
        patch -p1 --no-backup-if-mismatch <"$1"
    fi
}

# The tree with each pending patch applied on top of the ones before it: "label directory" lines.
patched_trees() {
    local tree=$root patch label copy
    shopt -s nullglob
    for patch in "$root"/kernels/pending/*.patch; do
        label=$(basename "$patch" .patch)
        copy=$(mktemp -d)
        (cd "$tree" && tar --exclude=./.git --exclude=./.venv --exclude=./out -cf - .) | tar -xf - -C "$copy"
        if ! (cd "$copy" && apply_patch "$patch") >"$out/apply_$label.txt" 2>&1; then
            echo "== $label: does not apply, see apply_$label.txt" >&2
            return 1
        fi
        echo "$label $copy"
        tree=$copy
    done
}

asked() {  # asked LABEL: whether the kernels phase measures the tree LABEL
    [[ $wanted == " all " || $wanted == *" $1 "* ]]
}

kernel_steps() {  # kernel_steps LABEL DIRECTORY, if LABEL was asked for
    asked "$1" || return 0
    step "tests_$1" "$2" "$python" -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py
    step "bench_$1" "$2" "$python" eval/bench_kernels.py --quick --sweep-splits --sweep-branch --sweep-dispatch --json "$out/bench_$1.json" --commit "$1"
}

trees=$(patched_trees) || failed=$((failed + 1))
case $phase in
    kernels)
        nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1
        kernel_steps main "$root"
        asked main && step placement "$root" "$python" -m pytest -q -p no:cacheprovider -m gpu tests/test_placement.py
        while read -r label directory; do
            [ -n "$label" ] && kernel_steps "$label" "$directory"
        done <<<"$trees"
        ;;
    decode)
        step decode_main "$root" "$python" eval/bench_decode.py --json "$out/decode_main.json" --commit main
        last=$(tail -n 1 <<<"$trees")
        if [ -n "$last" ]; then
            step "decode_${last%% *}" "${last#* }" "$python" eval/bench_decode.py --json "$out/decode_${last%% *}.json" \
                --commit "${last%% *}"
        fi
        ;;
    *)
        echo "unknown phase '$phase': kernels or decode" >&2
        exit 2
        ;;
esac
echo "failed steps: $failed"
exit "$failed"
