#!/usr/bin/env bash
# GPU machine, one call: the backward tests (Hopper kernel, then the mma.sync
# kernel alone), the four compute-sanitizer tools on smoke_backward (memcheck
# also with the mma.sync kernel), bwdstage (device.sh), `bench --backward`
# with sdpa_peer.py --backward ($QUICK: --quick or empty); binaries and the
# scripts from $DEV (build_bins.sh). Logs under $OUT, packed into logs.tgz
# (plus time.log and the peer table).
set -uo pipefail
out="${OUT:-device-out}"; dev="${DEV:-.devbin}"
mkdir -p "$out" /tmp/devbin
for f in "$dev"/*.xz; do xz -dc "$f" > "/tmp/devbin/$(basename "$f" .xz)"; done
chmod +x /tmp/devbin/*
export PYTHONUNBUFFERED=1
t="timeout 240"
st=0
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv,noheader | tee "$out/gpu.txt"
$t /tmp/devbin/gpu_backward --nocapture --test-threads 4 > "$out/gpu_backward.log" 2>&1 || st=1
echo "tests (hopper): $(grep -E 'test result' "$out/gpu_backward.log")"; grep -E "panicked" "$out/gpu_backward.log" | head -5
DISTR_ATTENTION_KERNEL=mma $t /tmp/devbin/gpu_backward --test-threads 4 > "$out/gpu_backward_mma.log" 2>&1 || st=1
echo "tests (mma.sync): $(grep -E 'test result' "$out/gpu_backward_mma.log")"; grep -E "panicked" "$out/gpu_backward_mma.log" | head -5
for tool in memcheck racecheck synccheck initcheck; do
    $t compute-sanitizer --tool "$tool" --error-exitcode 9 /tmp/devbin/smoke_backward > "$out/sanitizer_${tool}_backward.log" 2>&1
    rc=$?; [ $rc -eq 0 ] || st=1
    echo "$tool: exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer_${tool}_backward.log" | tail -n1)"
done
DISTR_ATTENTION_KERNEL=mma $t compute-sanitizer --tool memcheck --error-exitcode 9 /tmp/devbin/smoke_backward > "$out/sanitizer_memcheck_backward_mma.log" 2>&1
rc=$?; [ $rc -eq 0 ] || st=1; echo "memcheck (mma.sync): exit $rc"
DEV="$dev" bash "$dev/bst_device.sh" || st=1
$t /tmp/devbin/bench --backward --json "$out/ours_bwd.json" ${QUICK:-} > "$out/bwd_bench.log" 2>&1 || st=1
$t python3 "$dev/sdpa_peer.py" --backward --ours "$out/ours_bwd.json" ${QUICK:-} > "$out/bwd_peer.log" 2>&1 || st=1
cat "$out/bwd_bench.log"; grep -v '^{' "$out/bwd_peer.log" | tail -n 12
cp "$out/bwd_peer.log" "$out/peer_table.log"
(cd "$out" && tar czf /tmp/logs.tgz --exclude logs.tgz . && mv /tmp/logs.tgz . \
    && find . -type f ! -name logs.tgz ! -name time.log ! -name peer_table.log -delete)
echo "status $st"
exit $st
