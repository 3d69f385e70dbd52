#!/bin/sh
# xpcsfit-reprocess INCOMING RESULTS [SCHEDULER]
#
# Fit every result file (*.hdf, *.h5, *.hdf5) in INCOMING that has no result yet in
# RESULTS/<file name without suffix>/: the scheduled job's command until `xpcsfit batch`
# exists (DESIGN.md §6b), which will replace this script's one call in the CronJob.
#
# - Done means RESULTS/<name>/fit.json exists. A fit's --out is replaced atomically, so a
#   killed run leaves none and the next run fits the file again, resuming from its
#   checkpoint. A changed input is not noticed (xpcsfit batch will fingerprint inputs).
# - SCHEDULER: address of a running scheduler (tls://host:8786); without it every fit
#   starts its own LocalCluster.
# - XPCSFIT_FIT_OPTIONS: more options for every `xpcsfit fit`, e.g. "--gap 2.0e6".
# - Each file's outcome is one line on stdout, and a last line counts them; a file that
#   fails does not stop the others. Exit status: 0 when every fit converged (or nothing
#   was new), 1 otherwise.
set -u
usage="usage: xpcsfit-reprocess INCOMING RESULTS [SCHEDULER]"
incoming=${1:?$usage}
results=${2:?$usage}
scheduler=${3:-}
[ -d "$incoming" ] || { echo "xpcsfit-reprocess: $incoming: no such directory" >&2; exit 2; }
mkdir -p "$results" || exit 2

status=0 fitted=0 skipped=0 failed=0
for input in "$incoming"/*.hdf "$incoming"/*.h5 "$incoming"/*.hdf5; do
    [ -f "$input" ] || continue  # a pattern that matched nothing stays as it is
    name=${input##*/}
    name=${name%.*}
    if [ -e "$results/$name/fit.json" ]; then
        skipped=$((skipped + 1))
        continue
    fi
    # XPCSFIT_FIT_OPTIONS is split into words on purpose: it is a list of options.
    # shellcheck disable=SC2086
    xpcsfit fit "$input" --out "$results/$name" ${scheduler:+--scheduler "$scheduler"} ${XPCSFIT_FIT_OPTIONS:-}
    rc=$?
    echo "xpcsfit-reprocess: $input -> $results/$name: exit $rc"
    if [ "$rc" -eq 0 ]; then
        fitted=$((fitted + 1))
    else
        failed=$((failed + 1)) status=1
    fi
done
echo "xpcsfit-reprocess: $fitted fitted, $failed failed, $skipped done before"
exit "$status"
