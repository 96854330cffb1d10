#!/usr/bin/env bash
# GPU machine: new against v2 element by element (kAblate 0 and 8, D = 64 and
# 128, small cases with tails), then new vs old timings (interleaved) and
# new's cycle counters; logs under $OUT.
set -uo pipefail
out="${OUT:-device-out}"; mkdir -p "$out" /tmp/hst
dev="${DEV:-.devbin}"
for f in "$dev"/hst/*.xz; do xz -dc "$f" > /tmp/hst/$(basename "$f" .xz); done; chmod +x /tmp/hst/*
st=0
for D in 128 64; do
    for X in 0 8; do
        timeout 60 /tmp/hst/hstage_d$D check $X > "$out/check_d${D}_x$X.log" 2>&1 || st=1
        echo "D=$D X=$X: $(tail -n 1 "$out/check_d${D}_x$X.log")"
    done
done
for D in 128 64; do
    echo "== D=$D time"; timeout 240 /tmp/hst/hstage_d$D time 2>&1 | tee "$out/time_d$D.log"
    echo "== D=$D prof"; timeout 60 /tmp/hst/hstage_d$D prof 2>&1 | tee "$out/prof_d$D.log"
done
exit $st
