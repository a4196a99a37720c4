#!/bin/sh
# Check a submission tarball the way the FLARE22 organisers used it: load TEAM.tar.gz, then for every case a
# fresh input folder holding that one case and a fresh container of TEAM:latest running `sh predict.sh`.
#
#   sh container/check_submission.sh TEAM.tar.gz CASES_DIR OUTPUT_DIR
#
# Every `*.nii.gz` in CASES_DIR is a case; its mask must appear in OUTPUT_DIR as NAME.nii.gz for NAME_0000.nii.gz
# (other names are kept). Exit status 0 when every case ran with exit 0 and wrote its mask, 1 otherwise.
# The engine is FLARE_ENGINE (e.g. "podman --runtime runc"), else docker when its daemon answers, else podman.
# FLARE_GPUS adds the organisers' GPU option (FLARE_GPUS=device=1 gives --gpus=device=1; unset: no GPU, the
# image runs on the CPU); FLARE_RUN_ARGS adds other `run` options (e.g. "--network none").
set -eu

usage="usage: sh container/check_submission.sh TEAM.tar.gz CASES_DIR OUTPUT_DIR"
tarball=${1:?$usage}
cases_dir=${2:?$usage}
out_dir=${3:?$usage}
team=$(basename -- "$tarball" .tar.gz)
[ -f "$tarball" ] || { echo "check_submission.sh: $tarball: no such file" >&2; exit 2; }
[ -d "$cases_dir" ] || { echo "check_submission.sh: $cases_dir: no such folder" >&2; exit 2; }

. "$(dirname -- "$0")/engine.sh"
pick_engine check_submission.sh
gpus=${FLARE_GPUS:+--gpus=$FLARE_GPUS}

# The organisers' first step. Word splitting of $engine, $gpus and FLARE_RUN_ARGS is wanted throughout.
# podman (4.3) does not decompress a gzipped archive on stdin, which docker does: give it the tar.
case $engine in
  podman*)
    # shellcheck disable=SC2086
    gunzip -c -- "$tarball" | $engine image load ;;
  *)
    # shellcheck disable=SC2086
    $engine image load < "$tarball" ;;
esac

mkdir -p -- "$out_dir"
out_abs=$(CDPATH='' cd -- "$out_dir" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/flare-submission.XXXXXX")
trap 'rm -rf -- "$work"' EXIT
chmod 755 "$work"  # readable by the container's user whoever that is

cases=0
failed=0
for case_path in "$cases_dir"/*.nii.gz; do
  [ -f "$case_path" ] || continue
  name=$(basename -- "$case_path")
  expected=${name%_0000.nii.gz}
  [ "$expected" = "$name" ] || expected=$expected.nii.gz
  rm -rf -- "$work/inputs"
  mkdir -m 755 -- "$work/inputs"
  cp -- "$case_path" "$work/inputs/$name"
  chmod 644 -- "$work/inputs/$name"
  cases=$((cases + 1))
  # shellcheck disable=SC2086
  if $engine container run $gpus --name "$team" --rm -v "$work/inputs/:/workspace/inputs/" \
       -v "$out_abs/:/workspace/outputs/" ${FLARE_RUN_ARGS:-} "$team:latest" /bin/bash -c "sh predict.sh"; then
    status=0
  else
    status=$?
  fi
  if [ "$status" -ne 0 ] || [ ! -f "$out_abs/$expected" ]; then
    echo "FAILED $name: exit $status, $expected $([ -f "$out_abs/$expected" ] && echo written || echo missing)" >&2
    failed=$((failed + 1))
  else
    echo "ok $name -> $expected"
  fi
done

if [ "$cases" -eq 0 ]; then
  echo "check_submission.sh: no *.nii.gz in $cases_dir" >&2
  exit 2
fi
echo "$((cases - failed)) of $cases cases segmented by $team:latest from $tarball"
[ "$failed" -eq 0 ]
