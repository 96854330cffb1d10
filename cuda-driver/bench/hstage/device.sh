#!/usr/bin/env bash
# GPU machine: new against v2 element by element (D = 64 and 128, small cases
# with tails), then, if both pass, new/old/mid timings (interleaved) and
# new's cycle counters; logs under $OUT.
set -uo pipefail
out="${OUT:-device-out}"; mkdir -p "$out" /tmp/hst
dev="${DEV:-.devbin}"
for f in "$dev"/hst/*.xz; do xz -dc "$f" > /tmp/hst/$(basename "$f" .xz); done; chmod +x /tmp/hst/*
st=0
for D in 128 64; do
    timeout 30 /tmp/hst/hstage_d$D check > "$out/check_d$D.log" 2>&1 || st=1
    echo "D=$D: $(tail -n 1 "$out/check_d$D.log")"
done
[ $st -eq 0 ] || exit $st
for D in 128 64; do
    echo "== D=$D time"; timeout 240 /tmp/hst/hstage_d$D time 2>&1 | tee "$out/time_d$D.log"
    echo "== D=$D prof"; timeout 60 /tmp/hst/hstage_d$D prof 2>&1 | tee "$out/prof_d$D.log"
    echo "== D=$D timeline"; timeout 60 /tmp/hst/hstage_d$D timeline 2>&1 | tee "$out/timeline_d$D.log"
done
exit $st
