#!/usr/bin/env bash
# GPU machine: each version but old* and *nobulk* against old element by
# element (dQ, dK, dV of one G = 2 and one G = 1 backward), then the timings
# of every version, interleaved; logs under $OUT.
set -uo pipefail
out="${OUT:-device-out}"; mkdir -p "$out" /tmp/bst
dev="${DEV:-.devbin}"
for f in "$dev"/bst/*.xz; do xz -dc "$f" > /tmp/bst/$(basename "$f" .xz); done; chmod +x /tmp/bst/*
st=0
for g in 2 1; do
    timeout 60 /tmp/bst/bwdstage_old dump $g /tmp/old.bin || st=1
    for v in $(ls /tmp/bst | sed 's/^bwdstage_//' | grep -v -e '^old' -e nobulk); do
        timeout 60 /tmp/bst/bwdstage_$v dump $g /tmp/$v.bin \
            && timeout 60 /tmp/bst/bwdstage_old cmp /tmp/$v.bin /tmp/old.bin > "$out/cmp_${v}_g$g.log" 2>&1 || st=1
        echo "$v G=$g: $(cat "$out/cmp_${v}_g$g.log" | tr '\n' ' ')"
        rm -f /tmp/$v.bin
    done
done
rm -f /tmp/old.bin
for round in 1 2; do
    for g in 2 1; do
        for v in $(ls /tmp/bst | sed 's/^bwdstage_//'); do
            echo "$v $(timeout 60 /tmp/bst/bwdstage_$v time $g)"
        done
    done
done 2>&1 | tee "$out/time.log"
for v in $(ls /tmp/bst | sed 's/^bwdstage_//' | grep -v noatom); do echo "$v $(timeout 60 /tmp/bst/bwdstage_$v time 2 causal)"; done 2>&1 | tee -a "$out/time.log"
exit $st
