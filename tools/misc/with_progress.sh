#!/usr/bin/env bash
# with_progress.sh LOG LABEL COMMAND...: runs COMMAND with its output in LOG, printing a
# line a minute (elapsed time, and the file being compiled) so that a long build does
# not look hung; on failure prints the log's tail and where the whole log is.
set -uo pipefail
log=$1 label=$2
shift 2
mkdir -p "$(dirname "$log")"
start=$(date +%s)
echo "$label (log: $log)"
"$@" > "$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; exit 130' INT TERM
next=60
while kill -0 "$pid" 2>/dev/null; do
    sleep 2
    elapsed=$(($(date +%s) - start))
    if ((elapsed >= next)); then
        next=$((next + 60))
        # ninja prints "[done/total] compiler ... -c path/file.cpp ..." for each object.
        step=$(grep -aoE '^\[[0-9]+/[0-9]+\]' "$log" | tail -n 1)
        file=$(grep -aoE ' -c [^ ]+\.(cpp|cu|cc|c)( |$)' "$log" | tail -n 1 | awk '{print $2}')
        printf '  [%dm%02ds] %s %s%s\n' $((elapsed / 60)) $((elapsed % 60)) "$label" \
            "${step:+$step }" "${file:+$(basename "$file")}"
    fi
done
wait "$pid"
rc=$?
elapsed=$(($(date +%s) - start))
if ((rc != 0)); then
    tail -n 30 "$log"
    echo "$label FAILED after $((elapsed / 60))m$((elapsed % 60))s (exit $rc); the whole log: $log"
    exit "$rc"
fi
printf '  done in %dm%02ds\n' $((elapsed / 60)) $((elapsed % 60))
