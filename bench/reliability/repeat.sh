#!/usr/bin/env bash
# Run the crash, outage and graceful-shutdown scenarios N times (default 5) and print the
# one-line result of each (docs/RELIABILITY.md records them). Exit 1 if any run failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
runs=${1:-5}
pytest=${PYTEST:-.venv/bin/pytest}
failed=0
for i in $(seq 1 "$runs"); do
    echo "=== run $i/$runs $(date +%T), load average $(cut -d' ' -f1-3 /proc/loadavg)"
    out=$("$pytest" -q -p no:cacheprovider -s -rxX \
        tests/reliability/test_worker_crash.py \
        tests/reliability/test_db_outage.py \
        tests/reliability/test_graceful_shutdown.py 2>&1)
    rc=$?
    grep -E '^\[|passed|failed|^E  |^FAILED|XPASS' <<<"$out"
    [[ $rc == 0 ]] || failed=1
done
exit $failed
