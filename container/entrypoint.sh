#!/bin/sh
# The image's entry point: runs the command (by default `sh predict.sh`), then, when it ran as root,
# hands the files it created in the output folder to the owner of that folder, and exits with the
# command's status. Why: the organisers run the container as root with a host folder bind-mounted on
# /workspace/outputs; without this the host user would get masks owned by root. Run with
# `--user $(id -u):$(id -g)` instead and there is nothing to hand over (the files are already yours).
#
#   docker run --rm -v $PWD/in:/workspace/inputs -v $PWD/out:/workspace/outputs flare:latest [COMMAND...]
#
# FLARE_OUTPUTS names another output folder to hand over (default /workspace/outputs).
out=${FLARE_OUTPUTS:-/workspace/outputs}

if [ "$(id -u)" != 0 ] || [ ! -d "$out" ]; then
  exec "$@"
fi
owner=$(stat -c %u:%g "$out")
if [ "$owner" = 0:0 ]; then
  exec "$@"
fi

# As PID 1 a shell ignores SIGTERM unless it traps it: forward it so `docker stop` ends the run at once.
"$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM INT
status=0
wait "$child" || status=$?
while kill -0 "$child" 2>/dev/null; do  # wait was interrupted by a forwarded signal: wait for the real end
  status=0
  wait "$child" || status=$?
done
# Only what root created here, so files the user put in the folder keep their owner.
find "$out" -user 0 -exec chown "$owner" {} + 2>/dev/null || echo "entrypoint: could not chown $out to $owner" >&2
exit "$status"
