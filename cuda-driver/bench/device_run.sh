#!/usr/bin/env bash
# The one command of a device run: tests, compute-sanitizer, benchmark and
# the PyTorch peers, with logs under $OUT (or ./device-out). Binaries come
# from cuda-driver/bench/build_devbin.sh (built on a CPU machine, xz-packed
# into .devbin/ or $DEVBIN, carried to the GPU machine). On compute
# capability 9.0 the tests run twice: with the Hopper (wgmma) kernel where it
# applies, and with DISTR_ATTENTION_KERNEL=mma (the mma.sync kernel only).
#
#   bash cuda-driver/bench/device_run.sh [tests] [sanitizer] [backward] [similarity] [abi] [bench] [bwdbench] [quick]
#
# backward: tests/gpu_backward.rs and the four compute-sanitizer tools on
# examples/smoke_backward.rs; bwdbench: `bench --backward` (training steps)
# with sdpa_peer.py --backward;
# similarity: tests/gpu_similarity.rs; abi: the C library's CUDA entry points
# (Python tests on CUDA tensors, the C example and status test, memcheck of
# the example). The logs are packed into $OUT/logs.tgz at the end (the device
# tool brings back at most 8 files).
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
export DA_LIBRARY=/tmp/devbin/libdistr_attention.so PYTHONUNBUFFERED=1
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
if [[ $what == *backward* ]]; then
    echo "== backward tests"
    $t /tmp/devbin/gpu_backward --nocapture --test-threads 4 > "$out/gpu_backward.log" 2>&1 || status=1
    grep -E "test result|panicked" "$out/gpu_backward.log"; grep -q "test result: ok" "$out/gpu_backward.log" || status=1
    for tool in memcheck racecheck synccheck initcheck; do
        $t compute-sanitizer --tool "$tool" --error-exitcode 9 /tmp/devbin/smoke_backward > "$out/sanitizer_${tool}_backward.log" 2>&1
        rc=$?
        echo "$tool (backward): exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer_${tool}_backward.log" | tail -n1)"
        [ $rc -eq 0 ] || status=1
    done
fi
if [[ $what == *similarity* ]]; then
    echo "== similarity plan tests"
    $t /tmp/devbin/gpu_similarity --nocapture --test-threads 1 > "$out/gpu_similarity.log" 2>&1 || status=1
    grep -E "test result|panicked" "$out/gpu_similarity.log"; grep -q "test result: ok" "$out/gpu_similarity.log" || status=1
fi
if [[ $what == *abi* ]]; then
    echo "== C ABI on the GPU (Python, C example, status test)"
    $t python3 python/test_distr_attention.py -v > "$out/python_tests.log" 2>&1 || status=1
    tail -n 3 "$out/python_tests.log"
    $t /tmp/devbin/cuda_example 2 > "$out/cuda_example.log" 2>&1 || status=1
    tail -n 2 "$out/cuda_example.log"
    $t /tmp/devbin/cuda_status_test > "$out/cuda_status_test.log" 2>&1 || status=1
    tail -n 1 "$out/cuda_status_test.log"
    $t compute-sanitizer --tool memcheck --error-exitcode 9 /tmp/devbin/cuda_example 2 > "$out/sanitizer_memcheck_abi.log" 2>&1
    rc=$?; echo "memcheck (C example): exit $rc"; [ $rc -eq 0 ] || status=1
fi
if [[ " $what " == *" bench "* ]]; then
    echo "== benchmark"
    q=""; [[ $what == *quick* ]] && q="--quick"
    $t /tmp/devbin/bench --json "$out/ours.json" $q 2>&1 | tee "$out/bench.log" || status=1
    python3 "$peer" --ours "$out/ours.json" $q 2>&1 | tee "$out/peer.log" || status=1
fi
if [[ $what == *bwdbench* ]]; then
    echo "== training-step benchmark (forward + backward)"
    q=""; [[ $what == *quick* ]] && q="--quick"
    $t /tmp/devbin/bench --backward --json "$out/ours_bwd.json" $q > "$out/bwd_bench.log" 2>&1 || status=1
    python3 "$peer" --backward --ours "$out/ours_bwd.json" $q > "$out/bwd_peer.log" 2>&1 || status=1
    grep -v '^{' "$out/bwd_peer.log" | tail -n 14
fi
(cd "$out" && tar czf /tmp/logs.tgz --exclude logs.tgz . && mv /tmp/logs.tgz . \
    && find . -type f ! -name logs.tgz ! -name ours.json -delete)
exit $status
