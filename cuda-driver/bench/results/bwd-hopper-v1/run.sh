#!/usr/bin/env bash
# hbwd device run: smoke canary, backward tests, memcheck, benchmark with peers
# and the mma.sync backward (DISTR_ATTENTION_KERNEL=mma) in the same run.
set -uo pipefail
out="${OUT:-device-out}"
bin=.dev-bwdh
what="${*:-test san perf}"
mkdir -p "$out" /tmp/devbin
for f in "$bin"/*.xz; do xz -dc "$f" > "/tmp/devbin/$(basename "$f" .xz)"; done
chmod +x /tmp/devbin/*
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$out/gpu.txt"
echo "== smoke (canary)"
timeout 40 /tmp/devbin/smoke_backward > "$out/smoke.log" 2>&1; rc=$?
echo "smoke rc $rc"; tail -n 15 "$out/smoke.log"
if [ $rc -ne 0 ] && [ $rc -ne 1 ]; then what=""; fi   # hang or crash: stop here
if [[ $what == *test* ]]; then
    echo "== tests"
    timeout 150 /tmp/devbin/gpu_backward --nocapture --test-threads 6 > "$out/bwd_tests.log" 2>&1
    echo "tests rc $?"
    grep -E "^test |worst|SKIPPED|panicked|over tolerance|test result" "$out/bwd_tests.log" | head -60
fi
if [[ $what == *san* ]]; then
    for tool in memcheck racecheck synccheck initcheck; do
        timeout 100 compute-sanitizer --tool $tool --error-exitcode 9 /tmp/devbin/smoke_backward > "$out/san_$tool.log" 2>&1
        rc=$?; echo "$tool rc $rc: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/san_$tool.log" | tail -n1)"
        [ $rc -eq 0 ] || tail -n 25 "$out/san_$tool.log"
    done
fi
if [[ $what == *perf* ]]; then
    echo "== bench (hbwd)"
    timeout 90 /tmp/devbin/bench --backward --json "$out/ours_bwd.json" > "$out/bwd_bench.log" 2>&1; echo "bench rc $?"
    echo "== bench (mma.sync everywhere, DISTR_ATTENTION_KERNEL=mma)"
    DISTR_ATTENTION_KERNEL=mma timeout 90 /tmp/devbin/bench --backward --json "$out/mma_bwd.json" > "$out/mma_bench.log" 2>&1; echo "mma bench rc $?"
    echo "== peers"
    PYTHONUNBUFFERED=1 timeout 120 python3 "$bin/sdpa_peer.py" --backward --ours "$out/ours_bwd.json" > "$out/bwd_peer.log" 2>&1
    echo "peer rc $?"; grep -v '^{' "$out/bwd_peer.log" | tail -n 30
fi
cd "$out" && tar cJf logs.tar.xz *.log *.json gpu.txt 2>/dev/null; ls
