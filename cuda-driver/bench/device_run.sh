#!/usr/bin/env bash
# The one command of a device run: tests, compute-sanitizer, benchmark and
# the PyTorch peers, with logs under $OUT (or ./device-out). Binaries come
# from cuda-driver/bench/build_devbin.sh (built on a CPU machine, xz-packed
# into .devbin/, carried to the GPU machine).
#
#   bash cuda-driver/bench/device_run.sh [tests] [sanitizer] [bench] [quick]
set -uo pipefail
out="${OUT:-device-out}"
mkdir -p "$out" /tmp/devbin
what="${*:-tests sanitizer bench}"
for f in .devbin/*.xz; do xz -dc "$f" > "/tmp/devbin/$(basename "$f" .xz)"; done
chmod +x /tmp/devbin/*
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv | tee "$out/gpu.txt"
status=0
if [[ $what == *tests* ]]; then
    echo "== tests"
    /tmp/devbin/validation 2>&1 | tail -n 3 | tee "$out/validation.log" || status=1
    /tmp/devbin/gpu_tests --nocapture --test-threads 1 2>&1 | tee "$out/tests.log" | grep -vE "^\s+[0-9]+: |^\s+at " || status=1
    grep -q "test result: ok" "$out/tests.log" || status=1
fi
if [[ $what == *sanitizer* ]]; then
    echo "== compute-sanitizer"
    for tool in memcheck racecheck synccheck initcheck; do
        compute-sanitizer --tool "$tool" --error-exitcode 9 /tmp/devbin/smoke > "$out/sanitizer_$tool.log" 2>&1
        rc=$?
        echo "$tool: exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer_$tool.log" | tail -n1)"
        [ $rc -eq 0 ] || status=1
    done
fi
if [[ $what == *bench* ]]; then
    echo "== benchmark"
    q=""; [[ $what == *quick* ]] && q="--quick"
    /tmp/devbin/bench --json "$out/ours.json" $q 2>&1 | tee "$out/bench.log" || status=1
    PYTHONUNBUFFERED=1 python3 cuda-driver/bench/sdpa_peer.py --ours "$out/ours.json" $q 2>&1 | tee "$out/peer.log" || status=1
fi
exit $status
