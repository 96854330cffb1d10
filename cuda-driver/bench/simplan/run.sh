#!/usr/bin/env bash
# The device command of the similarity-plan run (from the repository root,
# binaries packed by build.sh next to this script): a quick check, the plan
# benchmark, Nsight Compute on the similarity plan (metrics and per-SASS
# instruction counts) and on the LSH plan, the tests, compute-sanitizer on
# the small case, the LSH plan tests. Logs under $OUT (all.tar.xz: every log).
#   SIMPLAN_SKIP_NCU=1          no Nsight Compute step
#   SIMPLAN_NCU_KERNELS="..."   kernels for the metrics step (default: G = 2 plans, LSH plan)
#   SIMPLAN_SKIP_LSH=1          no LSH plan tests (plan.cu unchanged)
set -uo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
out="${OUT:-device-out}"
logs=/tmp/sp/logs
mkdir -p "$out" /tmp/sp "$logs"
for f in "$here"/*.xz; do xz -dc "$f" > "/tmp/sp/$(basename "$f" .xz)"; done
chmod +x /tmp/sp/*
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$logs/gpu.txt"
status=0
echo "== quick check"
timeout 120 /tmp/sp/gpu_similarity small_case --nocapture 2>&1 | tail -n 8 | tee "$logs/quick.log"
echo "== plan benchmark"
timeout 240 /tmp/sp/plan_bench --json "$logs/plan_bench.json" 2>&1 | tee "$logs/plan_bench.log" || status=1
cp "$logs/plan_bench.log" "$out/"
if [ -z "${SIMPLAN_SKIP_NCU:-}" ]; then
    echo "== Nsight Compute: the similarity plan kernel (D=128, N=4096, G=2) and the LSH plan kernel"
    metrics="regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
    metrics+=",smsp__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active"
    metrics+=",sm__warps_active.avg.pct_of_peak_sustained_active,launch__occupancy_limit_shared_mem,launch__registers_per_thread"
    metrics+=",l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,smsp__inst_executed_op_shared_ld.sum"
    metrics+=",gpu__time_duration.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"
    metrics+=",dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__grid_size,launch__occupancy_limit_registers"
    for k in ${SIMPLAN_NCU_KERNELS:-da_simplan_bf16_d128_g2_sim da_simplan_bf16_d128_g2_kw da_plan_bf16_p16}; do
        timeout 90 ncu -k "regex:^$k\$" -c 1 --metrics "$metrics" /tmp/sp/plan_bench --quick --warmup 0 --reps 1 \
            > "$logs/ncu_$k.txt" 2>&1
        echo "-- $k"
        grep -E "^\s+(smsp|sm__|l1tex|gpu__|launch|dram)" "$logs/ncu_$k.txt" | awk '{ if ($NF+0 > 0.05 || $1 !~ /stalled/) print }'
    done
    # Executed instructions per SASS instruction (phases: kernels/NOTES.md).
    timeout 120 ncu -k "regex:^da_simplan_bf16_d128_g2_sim\$" -c 1 --section SourceCounters --import-source no \
        -o /tmp/sp/src_g2 -f /tmp/sp/plan_bench --quick --warmup 0 --reps 1 > "$logs/ncu_src.txt" 2>&1
    timeout 60 ncu -i /tmp/sp/src_g2.ncu-rep --page source --csv --print-source sass > "$logs/sass_g2_sim.csv" 2>> "$logs/ncu_src.txt"
    tail -n 3 "$logs/ncu_src.txt"
fi
echo "== tests"
timeout 300 /tmp/sp/gpu_similarity --nocapture --test-threads 8 2>&1 | tee "$logs/tests.log" | grep -vE "^\s+[0-9]+: |^\s+at " || status=1
grep -q "test result: ok" "$logs/tests.log" || status=1
echo "== compute-sanitizer (small case)"
for tool in memcheck racecheck synccheck; do
    timeout 200 compute-sanitizer --tool "$tool" --error-exitcode 9 /tmp/sp/gpu_similarity small_case > /tmp/sp/san_$tool.log 2>&1
    rc=$?
    echo "$tool: exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' /tmp/sp/san_$tool.log | tail -n1)" | tee -a "$logs/sanitizer.log"
    grep -E "=========" /tmp/sp/san_$tool.log | head -n 40 >> "$logs/sanitizer.log"
    [ $rc -eq 0 ] || status=1
done
echo "== LSH plan tests (engine.plan path)"
[ -n "${SIMPLAN_SKIP_LSH:-}" ] || timeout 120 /tmp/sp/gpu_tests gpu_plan --nocapture --test-threads 4 2>&1 | tail -n 12 | tee "$logs/lsh_tests.log" || status=1
tar -C "$logs" -cJf "$out/all.tar.xz" .
exit $status
