# Sourced by submit.sh and check_submission.sh: the container engine to use, in $engine.
# FLARE_ENGINE (e.g. "podman --runtime runc") if set, else docker when its daemon answers, else podman.
#   pick_engine SCRIPT_NAME      (the name its error message starts with)
pick_engine() {
  if [ -n "${FLARE_ENGINE:-}" ]; then
    engine=$FLARE_ENGINE
  elif docker info >/dev/null 2>&1; then
    engine=docker
  elif command -v podman >/dev/null 2>&1; then
    engine=podman
  else
    echo "$1: no container engine: no docker daemon answers and podman is not installed" >&2
    exit 2
  fi
}
