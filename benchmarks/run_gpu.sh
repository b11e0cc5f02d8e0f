#!/usr/bin/env bash
# The prepared GPU run, in two phases that each fit one device-tool command of under 5 minutes:
#
#   benchmarks/run_gpu.sh phase1          CUDA tests + kernel microbenchmarks (SGMV LoRA, paged attention)
#   benchmarks/run_gpu.sh phase2          7B + 4 LoRAs vs 32B, batch-1 decode bandwidth, multi-adapter scaling
#   benchmarks/run_gpu.sh phase3          host overhead of a decode step (micro model; optional, about 1 minute)
#   benchmarks/run_gpu.sh STEP ...        single steps (names below), or phase1 phase2 in one command;
#                                         no argument: phase1
#   benchmarks/run_gpu.sh --cpu-preflight [phase1 phase2 phase3]
#                                         the same steps smoke-sized on the CPU (default: all three);
#                                         exits 1 if a step fails (CI runs it: tests/test_benchmarks_smoke.py)
#
# Steps (cap in seconds on the GPU; a phase stops starting steps after PHASE_BUDGET_S, default 240;
# setup runs first in every command and counts against its first phase):
#   setup 90 (versions, package install), then
#   phase1: pytest_cuda 60, lora_kernels 80, attention 50
#   phase2: vs_32b 100, bandwidth 40, multi_lora 80
#   phase3: host_overhead 120
# Each benchmark gets --max-seconds (its cap minus a margin), writes its JSON after every case and
# times nothing that has not run once on the same shapes. Results (JSON, PNG) go straight to $OUT
# (the device machine's output folder; default a new temporary folder); logs, the step summary, the
# pytest report and a README preview made from the results go to one tarball, $OUT/run_gpu_<phases>.tar.gz,
# repacked after every step. $OUT never holds more than 8 files. Python: $PYTHON (default python3).
# MCL_COMMIT=<sha> names the commit where the checkout has no .git (the device tool sends none).
# SKIP_STEPS="a b" leaves steps out (CI's preflight leaves out pytest_cuda: CI collects the tests itself).
# The package is used from this checkout: if `import mcl_runtime.kernels` does not resolve here, the
# setup step runs `pip install --no-index --no-deps --no-build-isolation -e .` (builds the C++ block
# manager when CMake is present; else again with MCL_NO_EXT=1, the Python block manager).
# benchmarks/README.md: the device-tool calls, the time per phase, and how results are brought home.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
PREFLIGHT=0
if [[ "${1:-}" == --cpu-preflight ]]; then PREFLIGHT=1; shift; fi
ARGS=("$@")
(( ${#ARGS[@]} )) || { if (( PREFLIGHT )); then ARGS=(phase1 phase2 phase3); else ARGS=(phase1); fi; }
OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/run_gpu_out.XXXXXX")}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/run_gpu_work.XXXXXX")"
mkdir -p "$WORK/logs"
TAR="run_gpu_$(IFS=-; echo "${ARGS[*]}" | tr -c 'A-Za-z0-9_.\n-' '_').tar.gz"
SUMMARY="$WORK/summary.txt"
MAX_FILES=8
PHASE_BUDGET_S="${PHASE_BUDGET_S:-240}"
FAILED=()
export MPLBACKEND=Agg PYTHONUNBUFFERED=1 MCL_CACHE="${MCL_CACHE:-$WORK/mcl_cache}"
if (( PREFLIGHT )); then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
    SMOKE=(--smoke)
else
    unset TRITON_INTERPRET
    SMOKE=()
fi

log() { echo "[run_gpu $(date -u +%H:%M:%S)] $*" | tee -a "$SUMMARY"; }

# pack: the tarball of $WORK (logs, summary, report) plus at most MAX_FILES - 1 result files in $OUT;
# extra files (PNG first) move into the tarball.
pack() {
    local extra
    while (( $(find "$OUT" -type f ! -name "$TAR" | wc -l) > MAX_FILES - 1 )); do
        extra=$(find "$OUT" -type f ! -name "$TAR" -name '*.png' | sort | head -n 1)
        [[ -n "$extra" ]] || extra=$(find "$OUT" -type f ! -name "$TAR" | sort | tail -n 1)
        mkdir -p "$WORK/overflow"
        mv "$extra" "$WORK/overflow/"
    done
    find "$OUT" -mindepth 1 -type d -empty -delete
    tar -czf "$WORK.tar.gz" -C "$WORK" --exclude=mcl_cache . && mv "$WORK.tar.gz" "$OUT/$TAR"
}

# run_step NAME CAP MARGIN CMD...: CMD under a wall-clock cap (never past the phase budget); MARGIN > 0
# appends --max-seconds CAP-MARGIN, so the script stops starting cases in time to write its JSON.
run_step() {
    local name=$1 cap=$2 margin=$3; shift 3
    local left=$(( PHASE_BUDGET_S - ($(date +%s) - PHASE_START) ))
    if (( ! PREFLIGHT )) && (( left < 25 )); then
        log "$name: skipped, ${left}s left of the phase budget"; FAILED+=("$name(skipped)"); return
    fi
    (( PREFLIGHT )) && cap=$(( cap * PREFLIGHT_CAP_FACTOR ))
    (( ! PREFLIGHT && cap > left )) && cap=$left
    local cmd=("$@")
    (( margin > 0 )) && cmd+=(--max-seconds $(( cap > 2 * margin ? cap - margin : cap / 2 )))
    log "$name: start, cap ${cap}s: ${cmd[*]}"
    local t0=$(date +%s)
    timeout --kill-after=5 "$cap" "${cmd[@]}" >"$WORK/logs/$name.log" 2>&1
    local rc=$?
    log "$name: rc=$rc in $(( $(date +%s) - t0 ))s$( ((rc == 124 || rc == 137)) && echo ' (cap hit)')"
    tail -n 12 "$WORK/logs/$name.log"
    (( rc == 0 )) || FAILED+=("$name")
    pack
}

# setup_package: the package from this checkout (pip install -e . where it does not resolve here yet).
setup_package() {
    # run from / so that the current directory cannot stand in for an install
    local check='import importlib.util as u, sys, mcl_runtime, mcl_runtime.kernels as k
ext = u.find_spec("mcl_runtime._C")
files = [mcl_runtime.__file__, k.__file__] + ([ext.origin] if ext else [])
print("mcl_runtime:", *files, "; C++ block manager:", "yes" if ext else "no (Python block manager)")
sys.exit(not all(f.startswith(sys.argv[1]) for f in files))'
    (cd / && "$PY" -c "$check" "$ROOT/") 2>/dev/null && return 0
    local t0=$(date +%s)
    "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . \
        || MCL_NO_EXT=1 "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . || return 1
    echo "pip install -e . took $(( $(date +%s) - t0 ))s"
    (cd / && "$PY" -c "$check" "$ROOT/")
}

step_setup() {
    {
        if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version \
            --format=csv,noheader; else echo "no nvidia-smi here"; fi
        "$PY" -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
        echo "commit $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "${MCL_COMMIT:-unknown} (no git here: \$MCL_COMMIT)")"
    } 2>&1 | tee -a "$SUMMARY"
    export -f setup_package
    export PY ROOT
    run_step setup 90 0 bash -c setup_package
}

step_pytest_cuda() {
    run_step pytest_cuda 60 0 "$PY" -m pytest -m cuda -q -rfEs -p no:cacheprovider --junitxml="$WORK/pytest_cuda.xml"
}
step_lora_kernels() { run_step lora_kernels 80 20 "$PY" benchmarks/bench_lora_kernels.py "${SMOKE[@]}" --out-dir "$OUT"; }
step_attention()    { run_step attention 50 15 "$PY" benchmarks/bench_attention.py "${SMOKE[@]}" --out-dir "$OUT"; }
step_vs_32b()       { run_step vs_32b 100 35 "$PY" benchmarks/bench_vs_32b.py "${SMOKE[@]}" --out-dir "$OUT"; }
step_bandwidth()    { run_step bandwidth 40 0 "$PY" benchmarks/bench_bandwidth.py "${SMOKE[@]}" --out-dir "$OUT"; }
step_multi_lora()   { run_step multi_lora 80 30 "$PY" benchmarks/bench_multi_lora.py "${SMOKE[@]}" --out-dir "$OUT"; }
step_host_overhead() { run_step host_overhead 120 0 "$PY" benchmarks/bench_host_overhead.py "${SMOKE[@]}" --out-dir "$OUT"; }

report() {
    mkdir -p "$WORK/report"
    cp "$OUT"/*.json "$WORK/report/" 2>/dev/null
    "$PY" benchmarks/make_report.py "${SMOKE[@]}" --results-dir "$WORK/report" --out "$WORK/report/README.preview.md" \
        >"$WORK/logs/make_report.log" 2>&1 || { log "make_report failed, see logs/make_report.log"; FAILED+=(make_report); }
}

PHASE1=(pytest_cuda lora_kernels attention)
PHASE2=(vs_32b bandwidth multi_lora)
PHASE3=(host_overhead)
PREFLIGHT_CAP_FACTOR=5   # CPU smoke runs: the GPU caps x 5 (the interpreter is slow, the sizes tiny)

main() {
    local start=$(date +%s) first=1 steps s
    : >"$SUMMARY"
    log "run_gpu.sh ${ARGS[*]}$( ((PREFLIGHT)) && echo ' (CPU preflight: smoke sizes, not results)'); results to $OUT"
    PHASE_START=$start   # the setup counts against the first phase's budget
    step_setup
    if [[ " ${FAILED[*]} " == *" setup "* ]]; then log "setup failed: nothing else runs"; ARGS=(); fi
    for arg in "${ARGS[@]}"; do
        case "$arg" in
            phase1) steps=("${PHASE1[@]}") ;;
            phase2) steps=("${PHASE2[@]}") ;;
            phase3) steps=("${PHASE3[@]}") ;;
            *) steps=("$arg") ;;
        esac
        (( first )) || PHASE_START=$(date +%s)
        first=0
        for s in "${steps[@]}"; do
            if [[ " ${SKIP_STEPS:-} " == *" $s "* ]]; then log "$s: left out (SKIP_STEPS)"; continue; fi
            if declare -F "step_$s" >/dev/null && [[ $s != setup ]]; then "step_$s"; else log "unknown step $s"; FAILED+=("$s"); fi
        done
    done
    report
    log "done in $(( $(date +%s) - start ))s; failed: ${FAILED[*]:-none}"
    pack
    log "$(find "$OUT" -type f | wc -l) files in $OUT: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
    rm -rf "$WORK"
    (( ${#FAILED[@]} == 0 ))
}

main
