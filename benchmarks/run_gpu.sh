#!/usr/bin/env bash
# The one prepared GPU run: every GPU benchmark and the CUDA tests on one H100/H200 in about 10 minutes.
#
#   benchmarks/run_gpu.sh [STEP ...]        # default: all steps, in this order
#
# Steps (time cap in seconds):  pytest_cuda 75, lora_kernels 50, attention 50, vs_32b 170,
#                               multi_lora 140, bandwidth 45, serve 120 (only if that much time is left)
# Results (JSON, PNG) go to $OUT when set (the device machine's output folder), else benchmarks/results/;
# logs to <results>/logs/, one line per step (exit code, seconds) to <results>/run_gpu_summary.txt,
# and a README preview made from the results to <results>/README.preview.md. Copy the JSON/PNG files
# into benchmarks/results/ and run `python benchmarks/make_report.py` to update benchmarks/README.md.
# Environment: BUDGET_S (total seconds, default 560), SKIP_SERVE=1 to leave the server benchmark out.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RESULTS="${OUT:-$ROOT/benchmarks/results}"
mkdir -p "$RESULTS/logs"
SUMMARY="$RESULTS/run_gpu_summary.txt"
BUDGET_S="${BUDGET_S:-560}"
START=$(date +%s)
unset TRITON_INTERPRET

log() { echo "[run_gpu $(date +%H:%M:%S)] $*" | tee -a "$SUMMARY"; }

ensure_package() {
    if python -c "import mcl_runtime.kernels" 2>/dev/null; then return 0; fi
    log "mcl_runtime is not importable: pip install -e . (no network: build deps must be present)"
    pip install --no-build-isolation --no-deps -q -e . >"$RESULTS/logs/install.log" 2>&1 \
        || { log "install failed, see logs/install.log"; return 1; }
}

# run STEP CAP CMD...: run with a wall-clock cap, never more than the budget left.
run() {
    local step=$1 cap=$2; shift 2
    local left=$(( BUDGET_S - ($(date +%s) - START) ))
    if (( left < 20 )); then log "$step: skipped (budget spent)"; return; fi
    (( cap > left )) && cap=$left
    log "$step: start (cap ${cap}s)"
    local t0=$(date +%s)
    timeout --kill-after=10 "$cap" "$@" >"$RESULTS/logs/$step.log" 2>&1
    local rc=$?
    log "$step: rc=$rc in $(( $(date +%s) - t0 ))s$( ((rc == 124 || rc == 137)) && echo ' (time cap hit)')"
    tail -n 5 "$RESULTS/logs/$step.log"
}

step_pytest_cuda()  { run pytest_cuda 75 python -m pytest -m cuda -q -p no:cacheprovider --junitxml="$RESULTS/pytest_cuda.xml"; }
step_lora_kernels() { run lora_kernels 50 python benchmarks/bench_lora_kernels.py --out-dir "$RESULTS"; }
step_attention()    { run attention 50 python benchmarks/bench_attention.py --out-dir "$RESULTS"; }
step_vs_32b()       { run vs_32b 170 python benchmarks/bench_vs_32b.py --out-dir "$RESULTS" --max-seconds 140; }
step_multi_lora()   { run multi_lora 140 python benchmarks/bench_multi_lora.py --out-dir "$RESULTS" --max-seconds 110; }
step_bandwidth()    { run bandwidth 45 python benchmarks/bench_bandwidth.py --out-dir "$RESULTS"; }
step_serve() {
    local left=$(( BUDGET_S - ($(date +%s) - START) ))
    if [[ "${SKIP_SERVE:-0}" == 1 || $left -lt 120 ]]; then log "serve: skipped (SKIP_SERVE or under 120 s left)"; return; fi
    # writes a 15 GB random 7B folder under $MCL_CACHE first, and runs its CPU setup too
    run serve 120 python benchmarks/bench_serve.py --out-dir "$RESULTS" --max-seconds 10
}

main() {
    : >"$SUMMARY"
    log "results to $RESULTS, budget ${BUDGET_S}s"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$SUMMARY"
    ensure_package || exit 1
    local steps=("$@")
    (( ${#steps[@]} )) || steps=(pytest_cuda lora_kernels attention vs_32b multi_lora bandwidth serve)
    for s in "${steps[@]}"; do
        if declare -F "step_$s" >/dev/null; then "step_$s"; else log "unknown step $s"; fi
    done
    python benchmarks/make_report.py --results-dir "$RESULTS" --out "$RESULTS/README.preview.md" \
        >"$RESULTS/logs/make_report.log" 2>&1 || log "make_report failed, see logs/make_report.log"
    log "done in $(( $(date +%s) - START ))s"
}

main "$@"
