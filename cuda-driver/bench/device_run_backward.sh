#!/usr/bin/env bash
# The backward pass's device run, with logs under $OUT (or ./device-out):
# its tests, compute-sanitizer, the training-step benchmark against PyTorch
# and an Nsight Compute profile. Binaries come from
# cuda-driver/bench/build_devbin_backward.sh (built on a CPU machine,
# xz-packed into $DEVBIN, default .devbin, carried to the GPU machine).
#
#   bash cuda-driver/bench/device_run_backward.sh [bwdtest] [bwdsan] [bwdperf] [bwdprof] [quick]
#
#   bwdtest  tests/gpu_backward.rs, bwdsan  memcheck, racecheck, synccheck and
#   initcheck on examples/smoke_backward.rs, bwdperf  bench --backward and
#   sdpa_peer.py --backward (PEER=path: the peer script), bwdprof  Nsight
#   Compute on the backward kernels (D=128, N=4096, not causal). With quick:
#   the benchmark's one quick shape.
set -uo pipefail
out="${OUT:-device-out}"
mkdir -p "$out" /tmp/devbin
what="${*:-bwdtest bwdsan bwdperf}"
bin="${DEVBIN:-.devbin}"
peer="${PEER:-cuda-driver/bench/sdpa_peer.py}"
for f in "$bin"/*.xz; do xz -dc "$f" > "/tmp/devbin/$(basename "$f" .xz)"; done
chmod +x /tmp/devbin/*
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv | tee "$out/gpu.txt"
status=0
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
