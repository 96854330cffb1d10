#!/usr/bin/env bash
# GPU machine: v3 (current kernel) against v2, bitwise, on the check cases
# (D = 64, 128), then the stage-removal timings of both; logs under $OUT.
set -uo pipefail
out="${OUT:-device-out}"; mkdir -p "$out" /tmp/hst
dev="${DEV:-.devbin}"
for f in "$dev"/hst/*.xz; do xz -dc "$f" > /tmp/hst/$(basename "$f" .xz); done; chmod +x /tmp/hst/*
st=0
for D in 128 64; do
    timeout 60 /tmp/hst/hstage_v2_d$D dump /tmp/hst/ref_d$D.bin > /dev/null || st=1
    timeout 90 /tmp/hst/hstage_v3_d$D check /tmp/hst/ref_d$D.bin > "$out/check_d$D.log" 2>&1 || st=1
    echo "D=$D: $(tail -n 1 "$out/check_d$D.log")"
done
echo "== v3 stages"; timeout 120 /tmp/hst/hstage_v3_d128 time 2>&1 | tee "$out/stage_v3.log"
echo "== v2 stages"; timeout 120 /tmp/hst/hstage_v2_d128 time 2>&1 | tee "$out/stage_v2.log"
exit $st
