#!/usr/bin/env bash
# Nsight Compute profile of attention kernels on one benchmark shape
# (D=128, N=4096, not causal: the first shape of `bench --quick`), for the
# notes: speed of light, occupancy, warp stall reasons, tensor-pipe
# utilisation, shared-memory bank conflicts. Reports go to $OUT/ncu_<kernel>.txt.
#   bash cuda-driver/bench/profile.sh [kernel-name ...]
set -uo pipefail
out="${OUT:-device-out}"
mkdir -p "$out" /tmp/devbin
[ -x /tmp/devbin/bench ] || { xz -dc .devbin/bench.xz > /tmp/devbin/bench; chmod +x /tmp/devbin/bench; }
metrics="regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
metrics+=",sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"
metrics+=",smsp__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active"
metrics+=",l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum"
metrics+=",smsp__inst_executed_op_shared_ld.sum,smsp__inst_executed_op_shared_st.sum,smsp__inst_executed_op_ldgsts.sum"
metrics+=",gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active"
for k in "${@:-da_fwd_bf16_d128_g1_l128 da_fwd_bf16_d128_g2_l128}"; do
  for kk in $k; do
    echo "== ncu $kk"
    ncu -k "regex:^${kk}\$" -c 1 --metrics "$metrics" /tmp/devbin/bench --quick --warmup 0 --reps 1 \
        > "$out/ncu_$kk.txt" 2>&1
    grep -E "^\s+(smsp|sm__|l1tex|gpu__)" "$out/ncu_$kk.txt" | awk '{ if ($NF+0 > 0.05 || $1 !~ /stalled/) print }'
  done
done
