#!/usr/bin/env bash
# simplan v5 device run 2: quick plan benchmarks of base (v4) and the
# variants R, M2R, R0 in one run; the similarity tests and compute-sanitizer
# (memcheck, racecheck, synccheck) on M2R; memcheck on R's small cases.
set -uo pipefail
here=.dev-simplan4
out="${OUT:-/tmp/sp-out}"
logs=/tmp/sp/logs
mkdir -p "$out" "$logs"
for f in "$here"/*.xz; do xz -dc "$f" > "/tmp/sp/$(basename "$f" .xz)" & done
wait
chmod +x /tmp/sp/*_*
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader | tee "$logs/gpu.txt"
t0=$(date +%s)
for v in base R M2R R0; do
    echo "== $v"
    timeout 25 /tmp/sp/plan_bench_$v --quick > "$logs/quick_$v.log" 2>&1
    grep -E "^ 128" "$logs/quick_$v.log" | tee -a "$logs/quick_all.log"
done
status=0
echo "== M2R tests ($(( $(date +%s) - t0 )) s)"
timeout 60 /tmp/sp/gpu_similarity_M2R --nocapture --test-threads 8 > "$logs/tests_M2R.log" 2>&1 || status=1
grep -E "differ|test result" "$logs/tests_M2R.log" | sed 's/ have a decision.*//' | tail -n 24
san() {   # variant tool
    timeout 30 compute-sanitizer --tool "$2" --error-exitcode 9 /tmp/sp/gpu_similarity_$1 small_case > "$logs/san_$1_$2.log" 2>&1
    echo "$1 $2: exit $?; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|test result' "$logs/san_$1_$2.log" | tail -n2 | tr '\n' ' ')" | tee -a "$logs/sanitizer.log"
}
san M2R memcheck
san R memcheck
san M2R racecheck
san M2R synccheck
tar -C "$logs" -cJf "$out/all2.tar.xz" .
echo "== done ($(( $(date +%s) - t0 )) s)"
exit $status
