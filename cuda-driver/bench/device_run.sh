#!/usr/bin/env bash
# The one command of a device run: tests, compute-sanitizer, benchmark and
# the PyTorch peers, with logs under $OUT (or ./device-out). Binaries come
# from cuda-driver/bench/build_devbin.sh (built on a CPU machine, xz-packed
# into .devbin/ or $DEVBIN, carried to the GPU machine). On compute
# capability 9.0 the tests run twice: with the Hopper (wgmma) kernel where it
# applies, and with DISTR_ATTENTION_KERNEL=mma (the mma.sync kernel only).
#
#   bash cuda-driver/bench/device_run.sh [tests] [sanitizer] [bench] [quick]
set -uo pipefail
out="${OUT:-device-out}"
mkdir -p "$out" /tmp/devbin
what="${*:-tests sanitizer bench}"
bin="${DEVBIN:-.devbin}"
peer="${PEER:-cuda-driver/bench/sdpa_peer.py}"
# Each step is time-limited, so a hang fails the run instead of eating it.
t="timeout ${STEP_TIMEOUT:-300}"
for f in "$bin"/*.xz; do xz -dc "$f" > "/tmp/devbin/$(basename "$f" .xz)"; done
chmod +x /tmp/devbin/*
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv | tee "$out/gpu.txt"
status=0
if [[ $what == *tests* ]]; then
    echo "== tests"
    $t /tmp/devbin/validation 2>&1 | tail -n 3 | tee "$out/validation.log" || status=1
    $t /tmp/devbin/gpu_tests --nocapture --test-threads 1 2>&1 | tee "$out/tests.log" | grep -vE "^\s+[0-9]+: |^\s+at " || status=1
    grep -q "test result: ok" "$out/tests.log" || status=1
    $t /tmp/devbin/hopper_tests --nocapture --test-threads 1 2>&1 | tee "$out/hopper_tests.log" | grep -vE "^\s+[0-9]+: |^\s+at " || status=1
    grep -q "test result: ok" "$out/hopper_tests.log" || status=1
    echo "== tests, mma.sync kernel only"
    DISTR_ATTENTION_KERNEL=mma $t /tmp/devbin/gpu_tests --test-threads 1 > "$out/tests_mma.log" 2>&1 || status=1
    grep -E "test result" "$out/tests_mma.log"; grep -q "test result: ok" "$out/tests_mma.log" || status=1
fi
if [[ $what == *sanitizer* ]]; then
    echo "== compute-sanitizer"
    for tool in memcheck racecheck synccheck initcheck; do
        $t compute-sanitizer --tool "$tool" --error-exitcode 9 /tmp/devbin/smoke > "$out/sanitizer_$tool.log" 2>&1
        rc=$?
        echo "$tool: exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer_$tool.log" | tail -n1)"
        [ $rc -eq 0 ] || status=1
    done
    DISTR_ATTENTION_KERNEL=mma $t compute-sanitizer --tool memcheck --error-exitcode 9 /tmp/devbin/smoke > "$out/sanitizer_memcheck_mma.log" 2>&1
    rc=$?; echo "memcheck (mma.sync only): exit $rc"; [ $rc -eq 0 ] || status=1
fi
if [[ $what == *bench* ]]; then
    echo "== benchmark"
    q=""; [[ $what == *quick* ]] && q="--quick"
    $t /tmp/devbin/bench --json "$out/ours.json" $q 2>&1 | tee "$out/bench.log" || status=1
    PYTHONUNBUFFERED=1 python3 "$peer" --ours "$out/ours.json" $q 2>&1 | tee "$out/peer.log" || status=1
fi
exit $status
