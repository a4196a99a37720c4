#!/bin/sh
# Package an image for the FLARE22 organisers: TEAM.tar.gz, which `docker image load < TEAM.tar.gz` turns into
# the image TEAM:latest that they run once per case. Then check it with container/check_submission.sh.
#
#   sh container/submit.sh TEAM [IMAGE [OUT_DIR]]      IMAGE default flare:latest, OUT_DIR default .
#
# The engine is FLARE_ENGINE (e.g. "podman --runtime runc"), else docker when its daemon answers, else podman.
# podman names a local image localhost/NAME and would write that name into the archive, which docker would then
# load as localhost/TEAM:latest; so with podman the image is tagged docker.io/library/TEAM:latest, the long form
# of TEAM:latest, which `docker image load` reads as TEAM:latest.
set -eu

usage="usage: sh container/submit.sh TEAM [IMAGE [OUT_DIR]]"
team=${1:?$usage}
image=${2:-flare:latest}
out_dir=${3:-.}
case $team in
  *[!a-z0-9._-]* | [._-]*)
    echo "submit.sh: TEAM must be lower-case letters, digits, '.', '_' or '-' and start with a letter or digit" \
         "(docker's rule for image names); found '$team'" >&2
    exit 2 ;;
esac

. "$(dirname -- "$0")/engine.sh"
pick_engine submit.sh
case $engine in
  podman*) ref=docker.io/library/$team:latest ;;
  *) ref=$team:latest ;;
esac

# Word splitting of $engine is wanted ("podman --runtime runc").
# shellcheck disable=SC2086
$engine image tag "$image" "$ref"
mkdir -p -- "$out_dir"
tarball=$out_dir/$team.tar.gz
# Saved to a file first (sh has no pipefail: `save | gzip` would hide a failed save), compressed beside the
# target, then renamed: an interrupted run never leaves a truncated TEAM.tar.gz behind.
rm -f -- "$tarball.tar" "$tarball.tmp"
# shellcheck disable=SC2086
$engine image save -o "$tarball.tar" "$ref"
gzip -c -- "$tarball.tar" > "$tarball.tmp"
rm -f -- "$tarball.tar"
mv -- "$tarball.tmp" "$tarball"
echo "wrote $tarball ($(du -h -- "$tarball" | cut -f1)): $team:latest, from $image"
echo "check it as the organisers run it: sh container/check_submission.sh $tarball CASES_DIR OUTPUT_DIR"
