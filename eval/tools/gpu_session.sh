#!/usr/bin/env bash
# What waits for a lent GPU (docs/decisions/0004, "How a source becomes the default"), in device
# calls of under ten minutes each:
#
#   bash eval/tools/gpu_session.sh "$OUT" kernels [SOURCE...]  # GPU tests and kernel benchmark
#   bash eval/tools/gpu_session.sh "$OUT" decode [SOURCE...]   # decode tokens/s of the 7B-shaped stack
#
# SOURCEs are LLMCOMPRESS_KERNEL values (launch.SOURCES): default (kernels/w4_linear.cu) and
# tiled (kernels/w4_linear_tiled.cu); both by default, in that order, so each step under tiled
# is timed on the same machine in the same call as the default it would replace.
#
# kernels: once per SOURCE, with LLMCOMPRESS_KERNEL set to it:
#   - the GPU tests (`pytest -m gpu` on tests/test_kernels.py and tests/test_placement.py). The
#     kernel tests are parametrized by source and name it in their ids ([default-...],
#     [tiled-...]), so each run takes that source's tests plus every GPU test keyed to no source
#     (the `--device auto` test, whose blocks re-run on their compressed weights through the
#     selected source): each test runs once, under the value it tests. Each run compiles its
#     source's eight variants on first use (CuPy caches them on disk): about 15 s each for the
#     default, longer for tiled's sm_90a builds (its 256-token wgmma kernel alone took 12 s in
#     ptxas);
#   - eval/bench_kernels.py at 8192^2 with the split-K, branch-item and dispatch sweeps. Under
#     tiled, the rows above 16 tokens and the dispatch sweep also time the tiled kernel, and on
#     Hopper the wgmma kernel.
#   If one call runs long, split it: `kernels default`, then `kernels tiled` on the same warm
#   machine.
# decode: eval/bench_decode.py once per SOURCE.
#
# Every step writes its output to OUTPUT_FOLDER/STEP.txt (the benchmarks also STEP.json, with the
# source as "kernel") and the script goes on past a failing step, so one call brings back
# everything that could be measured. Exit status: the number of failed steps. COMMIT overrides
# the commit the benchmarks record (default: git rev-parse HEAD, "+changes" after it where the
# tree differs from it, "unknown" without git).
set -uo pipefail
usage="usage: gpu_session.sh OUTPUT_FOLDER kernels|decode [default] [tiled]"
out=${1:?$usage}
phase=${2:?$usage}
shift 2
all_sources=(default tiled)  # launch.SOURCES
if [ $# -gt 0 ]; then sources=("$@"); else sources=("${all_sources[@]}"); fi
for source in "${sources[@]}"; do
    [[ " ${all_sources[*]} " == *" $source "* ]] || { echo "unknown kernel source '$source': ${all_sources[*]}" >&2; exit 2; }
done
keyed=$(printf ' or %s' "${all_sources[@]}")  # tests whose ids name a source: " or default or tiled"
keyed=${keyed# or }
mkdir -p "$out"
root=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-python3}
commit=${COMMIT:-}
if [ -z "$commit" ]; then
    if commit=$(git -C "$root" rev-parse HEAD 2>/dev/null); then
        git -C "$root" diff --quiet HEAD 2>/dev/null || commit+="+changes"  # the tree differs from the commit
    else
        commit=unknown
    fi
fi
failed=0

step() {  # step NAME SOURCE COMMAND...: run COMMAND in the checkout under LLMCOMPRESS_KERNEL=SOURCE, its output to $out/NAME.txt
    local name=$1 source=$2
    shift 2
    echo "== $name (LLMCOMPRESS_KERNEL=$source): $*"
    if (cd "$root" && LLMCOMPRESS_KERNEL=$source PYTHONPATH="$root:$root/eval" "$@") >"$out/$name.txt" 2>&1; then
        tail -n 3 "$out/$name.txt"
    else
        echo "   FAILED (exit $?), see $name.txt:"
        tail -n 15 "$out/$name.txt"
        failed=$((failed + 1))
    fi
}

case $phase in
    kernels)
        nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1
        for source in "${sources[@]}"; do
            step "tests_$source" "$source" "$python" -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py tests/test_placement.py \
                -k "$source or not ($keyed)"
            step "bench_$source" "$source" "$python" eval/bench_kernels.py --quick --sweep-splits --sweep-branch --sweep-dispatch \
                --json "$out/bench_$source.json" --commit "$commit"
        done
        ;;
    decode)
        for source in "${sources[@]}"; do
            step "decode_$source" "$source" "$python" eval/bench_decode.py --json "$out/decode_$source.json" --commit "$commit"
        done
        ;;
    *)
        echo "unknown phase '$phase': kernels or decode" >&2
        exit 2
        ;;
esac
echo "failed steps: $failed"
exit "$failed"
