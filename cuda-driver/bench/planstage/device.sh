#!/usr/bin/env bash
# GPU machine: the planstage harness on the versions build.sh compiled; log under $OUT.
set -uo pipefail
out="${OUT:-device-out}"; mkdir -p "$out"
dev="${DEV:-.devbin}"
args=()
while read -r name; do args+=("$name=$dev/pst/$name.cubin"); done < "$dev/pst/versions"
timeout 120 "$dev/pst/planstage" "${args[@]}" 2>&1 | tee "$out/planstage.log"
exit "${PIPESTATUS[0]}"
