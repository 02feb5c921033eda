#!/usr/bin/env bash
# Index CBIS-DDSM on the shared volume and prepare the crops the cluster jobs train on, once.
# For research use only. Not for use in diagnostic procedures.
#
# Runs in the mammo-ray image on any node that mounts the shared volume at /shared:
#   KubeRay:          cluster/kuberay/job-load-cbis.yaml runs it once the download is on the volume
#   launcher cluster: ray job submit --working-dir . -- bash cluster/load_cbis.sh
#
# Reads the TCIA download where tune_configs/cbis_search.yaml and cbis_ensemble.yaml expect it:
#   /shared/CBIS-DDSM   the NBIA Data Retriever's tree (TCIA layout; the CSVs' own layout works too)
#   /shared/cbis-csvs   the four case-description CSVs
# and writes under $MAMMO_RAY_WORKDIR (/shared/mammo-ray):
#   check/manifest.parquet, check/manifest.report.json
#       `mammo-ray index`: every CSV row and the file it found, or why not (a quick check, no masks read)
#   index/, splits/, cache/
#       the index, the patient split and the crop caches of the cbis_* configs, under the keys their
#       jobs look up. `mammo-ray prepare` writes a cache to a path of its own (cache/<crop>), which the
#       jobs would not find; `mammo-ray demo --data-only` runs the same index, split and prepare steps
#       under the jobs' keys, and stops there (no Ray, no training).
# Each step is reused when its output exists: a second run finishes in seconds.
#
# LOAD_WORKERS (default: the CPUs this process may use) sets the processes that read and decode
# DICOMs (`index --workers`, `data.num_workers` for the prepare steps); the outputs do not depend on it.
set -euo pipefail

root=/shared/CBIS-DDSM
csvs=/shared/cbis-csvs
work=${MAMMO_RAY_WORKDIR:?set MAMMO_RAY_WORKDIR to the shared work directory, /shared/mammo-ray}
workers=${LOAD_WORKERS:-$(nproc)}

cd "$(dirname "$0")/.."   # the repository (or the image's copy of it): tune_configs/ lies here

for csv in mass_case_description_train_set.csv mass_case_description_test_set.csv \
    calc_case_description_train_set.csv calc_case_description_test_set.csv; do
    if [[ ! -f $csvs/$csv ]]; then
        echo "load_cbis: $csvs/$csv is missing: put the four CBIS-DDSM CSVs in $csvs (cluster/README.md)" >&2
        exit 1
    fi
done
if [[ -z $(find "$root" -name '*.dcm' -print -quit 2> /dev/null) ]]; then
    echo "load_cbis: no DICOM files under $root: put the TCIA download there (cluster/README.md)" >&2
    exit 1
fi

echo "load_cbis: 1/3 index (check) with $workers workers"
mammo-ray index --root "$root" --csv "$csvs" --out "$work/check/manifest.parquet" --no-boxes --workers "$workers"

echo "load_cbis: 2/3 index, split and 256-px crops of tune_configs/cbis_search.yaml (and cbis_ensemble.yaml)"
mammo-ray demo --config tune_configs/cbis_search.yaml --data-only --set data.num_workers="$workers"

echo "load_cbis: 3/3 the 320-px crops of the search's inception_v3 cells"
mammo-ray demo --config tune_configs/cbis_search.yaml --data-only --set data.num_workers="$workers" \
    --set data.cache_px=320 --set data.input_px=299

echo "load_cbis: done; the jobs of tune_configs/cbis_search.yaml and cbis_ensemble.yaml reuse these crops"
