#!/usr/bin/env bash
# simplan v5 device run 3: the landed source (M2R less an unused ballot):
# the similarity tests, memcheck on the small cases, one quick benchmark.
set -uo pipefail
here=.dev-simplan4
out="${OUT:-/tmp/sp-out}"
mkdir -p /tmp/sp "$out"
xz -dc $here/gpu_similarity_land.xz > /tmp/sp/gs & xz -dc $here/plan_bench_land.xz > /tmp/sp/pb & wait
chmod +x /tmp/sp/gs /tmp/sp/pb
t0=$(date +%s)
timeout 25 /tmp/sp/gs --nocapture --test-threads 8 > "$out/tests_land.log" 2>&1; echo "tests exit $?"
grep -E "differ|test result" "$out/tests_land.log" | sed 's/ have a decision.*//'
timeout 12 compute-sanitizer --tool memcheck --error-exitcode 9 /tmp/sp/gs small_case > "$out/memcheck_land.log" 2>&1
echo "memcheck exit $?; $(grep -E 'ERROR SUMMARY|test result' "$out/memcheck_land.log" | tr '\n' ' ')"
timeout 8 /tmp/sp/pb --quick > "$out/quick_land.log" 2>&1; grep -E "^ 128" "$out/quick_land.log"
echo "== done ($(( $(date +%s) - t0 )) s)"
