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
bin="${DEVBIN:-.devbin}"
peer="${PEER:-cuda-driver/bench/sdpa_peer.py}"
for f in "$bin"/*.xz; do xz -dc "$f" > "/tmp/devbin/$(basename "$f" .xz)"; done
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
    PYTHONUNBUFFERED=1 python3 "$peer" --ours "$out/ours.json" $q 2>&1 | tee "$out/peer.log" || status=1
fi
# The backward pass (options named apart from the ones above, which match substrings):
#   bwdtest  its tests (gpu_backward), bwdsan  the four sanitizers on smoke_backward,
#   bwdperf  the training-step benchmark (bench --backward, sdpa_peer.py --backward),
#   bwdprof  Nsight Compute on its kernels (D=128, N=4096, not causal). With quick: one shape.
bq=""; [[ $what == *quick* ]] && bq="--quick"
if [[ $what == *bwdtest* ]]; then
    echo "== backward tests"
    /tmp/devbin/gpu_backward --nocapture --test-threads 6 2>&1 | tee "$out/bwd_tests.log" \
        | grep -E "^test |worst|SKIPPED|panicked|over tolerance|test result" || status=1
    grep -q "test result: ok" "$out/bwd_tests.log" || status=1
fi
if [[ $what == *bwdsan* ]]; then
    echo "== compute-sanitizer (backward)"
    for tool in memcheck racecheck synccheck initcheck; do
        timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 9 /tmp/devbin/smoke_backward \
            > "$out/bwd_sanitizer_$tool.log" 2>&1
        rc=$?
        echo "$tool: exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/bwd_sanitizer_$tool.log" | tail -n1)"
        [ $rc -eq 0 ] || { status=1; tail -n 30 "$out/bwd_sanitizer_$tool.log"; }
    done
fi
if [[ $what == *bwdperf* ]]; then
    echo "== training-step benchmark"
    /tmp/devbin/bench --backward --json "$out/ours_bwd.json" $bq 2>&1 | tee "$out/bwd_bench.log" || status=1
    PYTHONUNBUFFERED=1 python3 "$peer" --backward --ours "$out/ours_bwd.json" $bq 2>&1 | tee "$out/bwd_peer.log" \
        | grep -v '^{' || status=1
fi
if [[ $what == *bwdprof* ]]; then
    echo "== ncu (backward kernels, D=128, N=4096, not causal)"
    metrics="regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
    metrics+=",sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"
    metrics+=",smsp__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active"
    metrics+=",l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum"
    metrics+=",l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,smsp__inst_executed_op_shared_ld.sum"
    metrics+=",gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active,dram__bytes.sum"
    for k in da_bwd_bf16_d128_g1 da_bwd_bf16_d128_g2; do
        ncu -k "regex:^${k}\$" -c 1 --metrics "$metrics" /tmp/devbin/bench --backward --quick --warmup 0 --reps 1 \
            > "$out/ncu_$k.txt" 2>&1
        echo "-- $k"
        grep -E "^\s+(smsp|sm__|l1tex|gpu__|dram)" "$out/ncu_$k.txt" | awk '{ if ($NF+0 > 0.05 || $1 !~ /stalled/) print }'
    done
    ncu -k "regex:da_(bwd|fwd|plan)" -c 40 --metrics gpu__time_duration.sum /tmp/devbin/bench --backward --quick \
        --warmup 0 --reps 1 > "$out/ncu_durations.txt" 2>&1
    echo "-- kernel durations in launch order"
    grep -E "^  da_|gpu__time_duration" "$out/ncu_durations.txt" | paste - - | awk '{print $1, $(NF-1), $NF}'
fi
exit $status
