#!/usr/bin/env bash
# simplan v5 device run (from the repository root): v5 and base (v4) plan
# benchmarks in the same run, the similarity tests, compute-sanitizer on the
# small cases, Nsight Compute on the G = 2 similarity plan (v5 and base).
set -uo pipefail
here=.dev-simplan4
out="${OUT:-/tmp/sp-out}"
logs=/tmp/sp/logs
mkdir -p "$out" "$logs"
export PYTHONUNBUFFERED=1
for f in "$here"/*.xz; do xz -dc "$f" > "/tmp/sp/$(basename "$f" .xz)" & done
wait
chmod +x /tmp/sp/gpu_similarity /tmp/sp/plan_bench /tmp/sp/plan_bench_base
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$logs/gpu.txt"
status=0
t0=$(date +%s)
echo "== quick check"
timeout 60 /tmp/sp/gpu_similarity small_case --nocapture 2>&1 | tail -n 6 | tee "$logs/quick.log"
echo "== plan benchmark v5"
timeout 80 /tmp/sp/plan_bench --json "$logs/plan_bench.json" > "$logs/plan_bench.log" 2>&1 || status=1
cat "$logs/plan_bench.log"
echo "== plan benchmark base (v4)"
timeout 80 /tmp/sp/plan_bench_base --json "$logs/plan_bench_base.json" > "$logs/plan_bench_base.log" 2>&1
cat "$logs/plan_bench_base.log"
echo "== v5 quick again"
timeout 30 /tmp/sp/plan_bench --quick > "$logs/plan_bench_quick2.log" 2>&1; cat "$logs/plan_bench_quick2.log"
echo "== tests ($(( $(date +%s) - t0 )) s)"
timeout 120 /tmp/sp/gpu_similarity --nocapture --test-threads 8 > "$logs/tests.log" 2>&1 || status=1
grep -E "^test |test result|differ" "$logs/tests.log" | grep -vE "^\s+[0-9]+: " | tail -n 40
grep -q "test result: ok" "$logs/tests.log" || status=1
echo "== compute-sanitizer ($(( $(date +%s) - t0 )) s)"
for tool in memcheck racecheck synccheck; do
    timeout 60 compute-sanitizer --tool "$tool" --error-exitcode 9 /tmp/sp/gpu_similarity small_case > "$logs/san_$tool.log" 2>&1
    rc=$?
    echo "$tool: exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$logs/san_$tool.log" | tail -n1)" | tee -a "$logs/sanitizer.log"
    [ $rc -eq 0 ] || status=1
done
echo "== ncu ($(( $(date +%s) - t0 )) s)"
m="smsp__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,gpu__time_duration.sum,launch__registers_per_thread,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem"
m+=",regex:smsp__average_warps_issue_stalled_(barrier|short_scoreboard|long_scoreboard|wait|math_pipe_throttle|mio_throttle|no_instruction|branch_resolving|membar|lg_throttle|dispatch_stall|not_selected|selected|sleeping|drain|misc|tex_throttle|imc_miss)_per_issue_active\.ratio"
for b in plan_bench plan_bench_base; do
    timeout 45 ncu -k "regex:^da_simplan_bf16_d128_g2_sim\$" -c 1 --metrics "$m" /tmp/sp/$b --quick --warmup 0 --reps 1 > "$logs/ncu_g2_sim_$b.txt" 2>&1
    echo "-- $b"; grep -E "^\s+(smsp|sm__|gpu__|launch)" "$logs/ncu_g2_sim_$b.txt" | awk '{ if ($NF+0 > 0.05 || $1 !~ /stalled/) print }'
done
timeout 70 ncu -k "regex:^da_simplan_bf16_d128_g2_sim\$" -c 1 --section SourceCounters --import-source no \
    -o /tmp/sp/src_g2 -f /tmp/sp/plan_bench --quick --warmup 0 --reps 1 > "$logs/ncu_src.txt" 2>&1
timeout 30 ncu -i /tmp/sp/src_g2.ncu-rep --page source --csv --print-source sass > "$logs/sass_g2_sim.csv" 2>> "$logs/ncu_src.txt"
tail -n 2 "$logs/ncu_src.txt"
echo "== done ($(( $(date +%s) - t0 )) s), status $status"
tar -C "$logs" -cJf "$out/all.tar.xz" .
exit $status
