#!/usr/bin/env bash
# Every check that needs CUDA, in one run on a GPU machine (one GPU: under 10 minutes by estimate; it has not run
# yet, see docs/scaling.md). CI has no GPU; run this whenever one is lent to you:
#
#     scripts/gpu_check.sh            # every check; a check whose package is missing (vllm, flash_attn,
#                                     # bitsandbytes, deepspeed, trl) is SKIP, with the reason
#     scripts/gpu_check.sh --strict   # a SKIP fails too
#     GPU_CHECK_ONLY=fsdp,fp16-full scripts/gpu_check.sh   # some checks, by name
#
# Prints a table (check, status, seconds, note) and exits non-zero if any check failed. Logs go to
# $GPU_CHECK_LOGS (default gpu_check_logs/). The bench checks write bench/results/<area>-<gpu>.json (small settings:
# they check that the benchmarks run and record; measure with the defaults) and check that every row of it has its
# peak GPU memory. With $GPU_CHECK_OUT set (a lent machine's $OUT), the logs, the table and those results files
# are copied there at the end.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
STRICT=0
[ "${1:-}" = "--strict" ] && STRICT=1
LOGS=${GPU_CHECK_LOGS:-gpu_check_logs}
mkdir -p "$LOGS"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY=${PYTHON:-python}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible to torch ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1))" >&2
    exit 2
fi
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0), 'x', torch.cuda.device_count())")
echo "gpu_check on $GPU; logs in $LOGS/"

NAMES=() STATUS=() SECONDS_TAKEN=() NOTES=()
record() {  # name status seconds note
    NAMES+=("$1") STATUS+=("$2") SECONDS_TAKEN+=("$3") NOTES+=("$4")
    printf '  %-14s %-5s %5ss  %s\n' "$1" "$2" "$3" "$4"
}
wanted() { [ -z "${GPU_CHECK_ONLY:-}" ] || [[ ",$GPU_CHECK_ONLY," == *",$1,"* ]]; }

# pytest NAME LIMIT_S TEST_ID...: PASS when every test passed, SKIP when all were skipped (the reasons noted),
# FAIL otherwise (a failure, an error, a test id that does not exist, the time limit).
pytest_check() {
    local name=$1 limit=$2
    shift 2
    wanted "$name" || return 0
    local log="$LOGS/$name.log" start=$SECONDS rc
    timeout "$limit" "$PY" -m pytest -q -rs -p no:cacheprovider "$@" >"$log" 2>&1
    rc=$?
    local summary
    summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)' "$log" | tail -1 | tr -d '=')
    local took=$((SECONDS - start))
    if [ "$rc" -eq 124 ]; then
        record "$name" FAIL "$took" "over ${limit}s ($log)"
    elif [ "$rc" -ne 0 ]; then
        record "$name" FAIL "$took" "${summary:-pytest exit $rc} ($log)"
    elif [[ "$summary" == *passed* ]]; then
        record "$name" PASS "$took" "$summary"
    else
        local reason
        reason=$(grep -m1 '^SKIPPED' "$log" | sed 's/^SKIPPED \[[0-9]*\] [^:]*:[0-9]*: //')
        record "$name" SKIP "$took" "${reason:-$summary}"
    fi
}

# bench NAME AREA LIMIT_S ARGS...: the benchmark writes bench/results/AREA-<gpu>.json today, every row with
# peak_gpu_mb. SKIP when its peer (trl) is not installed.
bench_check() {
    local name=$1 area=$2 limit=$3
    shift 3
    wanted "$name" || return 0
    local log="$LOGS/$name.log" start=$SECONDS rc
    if [ "$area" != serve ] && ! "$PY" -c "import trl" 2>/dev/null; then
        record "$name" SKIP 0 "trl is not installed (the benchmark's peer)"
        return 0
    fi
    timeout "$limit" "$PY" "bench/$area.py" "$@" >"$log" 2>&1
    rc=$?
    local took=$((SECONDS - start))
    if [ "$rc" -ne 0 ]; then
        record "$name" FAIL "$took" "bench/$area.py exit $rc ($log)"
        return 0
    fi
    local verdict
    verdict=$("$PY" - "$area" <<'EOF' 2>&1
import datetime, json, sys
import torch
from bench.common import results_path
area = sys.argv[1]
path = results_path(area, torch.cuda.get_device_name(0))
results = json.loads(path.read_text())
assert results["date"] == datetime.date.today().isoformat(), f"{path}: not written today"
missing = [row["name"] for row in results["rows"] if not row.get("peak_gpu_mb")]
assert not missing, f"{path}: no peak_gpu_mb in rows {missing}"
print(f"{path.name}: {len(results['rows'])} rows with GPU memory")
EOF
    )
    if [ $? -eq 0 ]; then
        record "$name" PASS "$took" "$verdict"
    else
        record "$name" FAIL "$took" "$(echo "$verdict" | tail -1)"
    fi
}

START=$SECONDS
# Finding 6, 11: vLLM behind the engine interface; ranks vLLM accepts; shutdown frees the GPU; each sync a new name.
pytest_check vllm-engine 300 \
    tests/unit/test_vllm_engine.py::test_vllm_greedy_matches_the_transformers_engine \
    tests/unit/test_vllm_engine.py::test_a_second_engine_starts_after_close_and_serves_rank_24_adapters
pytest_check vllm-sync 200 tests/unit/test_vllm_engine.py::test_a_synced_adapter_is_served_with_its_new_weights
# PPO with rollout.backend=vllm: adapter synced before each rollout, the last two sync folders kept.
pytest_check ppo-vllm 240 tests/unit/test_vllm_engine.py::test_ppo_rollouts_through_vllm_follow_the_actor
# Finding 1, 2: PPO's default on-policy path and its EMA resumed, on CUDA.
pytest_check ppo-cuda 200 tests/unit/test_gpu_paths.py::test_cuda_ppo_on_policy_rloo_resumes_its_ema_onto_the_gpu
# QLoRA SFT with 8-bit AdamW (bitsandbytes' CUDA kernels).
pytest_check qlora-8bit 200 tests/unit/test_gpu_paths.py::test_cuda_qlora_sft_with_8bit_adamw
# Finding 3, 9: bf16 with flash-attention 2; packed rows give the loss of the samples one by one.
pytest_check fa2-packed 120 tests/unit/test_gpu_paths.py::test_cuda_flash_attention_2_packed_loss_equals_unpacked
# Finding 5: fp16 full fine-tuning (fp32 master weights, fp16 autocast, loss scaling).
pytest_check fp16-full 150 tests/unit/test_gpu_paths.py::test_cuda_fp16_full_finetune_trains_fp32_master_weights
# Finding 8: FSDP2 with the shipped config over the GPUs present, then a resume from its sharded state.
pytest_check fsdp 300 tests/unit/test_fsdp.py::test_fsdp_on_the_gpus_present
# Finding 4, 10: DeepSpeed ZeRO-2 / ZeRO-3 with the shipped configs, batch 2 x accumulation 2.
pytest_check deepspeed 400 tests/unit/test_gpu_paths.py::test_cuda_deepspeed_accumulates_and_saves
# Finding 15: the benchmarks on the GPU, with GPU memory (small settings: this checks that they run and record).
bench_check bench-sft sft 400 --steps 4 --warmup 1 --seq-len 256
bench_check bench-serve serve 300 --clients 1,4 --max-tokens 32 --min-requests 4
bench_check bench-ppo ppo 500 --steps 3 --warmup 1 --max-new-tokens 16

echo
printf '%-14s %-5s %8s  %s\n' check status seconds note
printf '%-14s %-5s %8s  %s\n' -------------- ----- -------- ----
failed=0
for i in "${!NAMES[@]}"; do
    printf '%-14s %-5s %8s  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECONDS_TAKEN[$i]}" "${NOTES[$i]}"
    case "${STATUS[$i]}" in
        FAIL) failed=$((failed + 1)) ;;
        SKIP) [ "$STRICT" -eq 1 ] && failed=$((failed + 1)) ;;
    esac
done
echo "total $((SECONDS - START)) s on $GPU; $failed failed$([ "$STRICT" -eq 1 ] && echo ' (skips count: --strict)')"
if [ -n "${GPU_CHECK_OUT:-}" ]; then
    mkdir -p "$GPU_CHECK_OUT/results"
    cp -r "$LOGS" "$GPU_CHECK_OUT/"
    cp bench/results/*-*.json "$GPU_CHECK_OUT/results/" 2>/dev/null
    for i in "${!NAMES[@]}"; do printf '%s\t%s\t%s\t%s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECONDS_TAKEN[$i]}" \
        "${NOTES[$i]}"; done >"$GPU_CHECK_OUT/gpu_check.tsv"
fi
[ "$failed" -eq 0 ]
