#!/usr/bin/env bash
# Run a cvpipe stage inside its Docker image.
#
#   ./docker-shell.sh <stage|all> [cvpipe args...]   e.g. ./docker-shell.sh train --epochs 3 -S train.lr=0.001
#   ./docker-shell.sh <stage> --shell                 a bash shell in the stage image (same mounts), for debugging
#   ./docker-shell.sh <stage|all> --build-only        build the image(s) and stop
#
# <stage> is any folder of this repo holding a Dockerfile (ingest, preprocess, train,
# evaluate, app), or compare (`cvpipe compare` in the evaluate image); `all` runs the four
# pipeline stages in order with the same args (and builds every image). The image is
# (re)built first: Docker's layer cache makes that a few seconds when nothing changed, and
# a code change rebuilds only the last layer.
#
# What the container sees (cwd /work):
#   <project>/params.yaml (read-only) and <project>/{data,models,metrics,plots,exports,reports,
#   wandb,.cvpipe} (read-write; created first so they are not root-owned). <project> is $CVPIPE_PROJECT_DIR,
#   default this repository. Outputs are written as the caller's uid:gid.
#   GOOGLE_APPLICATION_CREDENTIALS (when set): the key file, mounted read-only.
#   WANDB_API_KEY and every CVPIPE_SOURCE_* variable (the credentials `cvpipe init` wrote into
#   ingest.source as ${CVPIPE_SOURCE_...}; when set): passed by name, so no value is on a command line.
#   WANDB_MODE WANDB_PROJECT WANDB_ENTITY CVPIPE_DEBUG STORAGE_EMULATOR_HOST OMP_NUM_THREADS
#   CUDA_VISIBLE_DEVICES GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT (PASS_ENV): passed through when set.
#   GPUs: `--gpus all` for the torch stages when Docker has the NVIDIA runtime and
#   nvidia-smi sees a GPU (CVPIPE_GPUS=auto, the default); CVPIPE_GPUS=all forces it,
#   CVPIPE_GPUS=none turns it off, anything else is passed as `--gpus $CVPIPE_GPUS`.
# Other knobs: CVPIPE_DOCKER_ARGS (extra `docker run` options, e.g. "-v /photos:/photos:ro"
# or "--network host" for an emulator on 127.0.0.1), CVPIPE_NO_BUILD=1 (use the existing
# image), CVPIPE_IMAGE_TAG (default latest), CVPIPE_BUILD_VERBOSE=1 (full build log),
# DOCKER (the docker client, default `docker`), PYPI_URL (the package index for the
# build; default: your pip configuration, scripts/index_url.sh).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROJECT=$(cd "${CVPIPE_PROJECT_DIR:-$REPO}" && pwd)
DOCKER=${DOCKER:-docker}
TAG=${CVPIPE_IMAGE_TAG:-latest}
PIPELINE=(ingest preprocess train evaluate)
OUTPUT_DIRS=(data models metrics plots exports reports wandb .cvpipe)
PASS_ENV=(WANDB_MODE WANDB_PROJECT WANDB_ENTITY CVPIPE_DEBUG STORAGE_EMULATOR_HOST
          GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT OMP_NUM_THREADS CUDA_VISIBLE_DEVICES)

die() { echo "docker-shell.sh: $*" >&2; exit 2; }

stages_with_dockerfile() {
  local d
  for d in "$REPO"/*/Dockerfile; do [ -f "$d" ] && basename "$(dirname "$d")"; done
}

image_of() { echo "cvpipe-$1:$TAG"; }

build() {
  local stage=$1 index source revision
  index=${PYPI_URL:-$(PYTHON=${PYTHON:-python3} sh "$REPO/scripts/index_url.sh")}
  # the repository URL without any user:token@ part
  source=$(git -C "$REPO" config --get remote.origin.url 2>/dev/null | sed -E 's#//[^@/]*@#//#' || true)
  revision=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
  local args=(build -f "$REPO/$stage/Dockerfile" -t "$(image_of "$stage")"
              --build-arg "PIP_INDEX_URL=$index" --build-arg "SOURCE_URL=$source"
              --build-arg "REVISION=$revision")
  [ -n "${BASE_IMAGE:-}" ] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  if [ "${CVPIPE_BUILD_VERBOSE:-0}" = 1 ]; then
    "$DOCKER" "${args[@]}" "$REPO" >&2
  else
    echo "docker-shell.sh: building $(image_of "$stage") (cached layers are reused)" >&2
    "$DOCKER" "${args[@]}" -q "$REPO" >/dev/null
  fi
}

gpu_flags() {
  local stage=$1
  case "$stage" in ingest|preprocess) return ;; esac   # no torch in these images
  case "${CVPIPE_GPUS:-auto}" in
    none|off|0|"") ;;
    auto)
      if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 \
         && "$DOCKER" info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia; then
        echo "--gpus all"
      fi ;;
    *) echo "--gpus ${CVPIPE_GPUS}" ;;
  esac
}

run_stage() {
  local stage=$1; shift
  local shell=$1; shift
  [ -f "$PROJECT/params.yaml" ] || die "$PROJECT/params.yaml not found"
  # --init: Docker's tini is PID 1 and forwards signals, so `docker stop` ends the stage at once
  # instead of waiting out its timeout (Python as PID 1 has no default SIGTERM handler)
  local args=(run --rm --init --user "$(id -u):$(id -g)" -w /work
              -v "$PROJECT/params.yaml:/work/params.yaml:ro"
              -e CVPIPE_CACHE=/work/.cvpipe/cache)
  local d
  for d in "${OUTPUT_DIRS[@]}"; do
    mkdir -p "$PROJECT/$d"
    args+=(-v "$PROJECT/$d:/work/$d")
  done
  if [ -n "${GOOGLE_APPLICATION_CREDENTIALS:-}" ]; then
    [ -f "$GOOGLE_APPLICATION_CREDENTIALS" ] || die "GOOGLE_APPLICATION_CREDENTIALS=$GOOGLE_APPLICATION_CREDENTIALS is not a file"
    args+=(-v "$(realpath "$GOOGLE_APPLICATION_CREDENTIALS"):/run/secrets/gcp-credentials.json:ro"
           -e GOOGLE_APPLICATION_CREDENTIALS=/run/secrets/gcp-credentials.json)
  fi
  [ -n "${WANDB_API_KEY:-}" ] && args+=(-e WANDB_API_KEY)   # by name: the value stays out of argv
  local v
  for v in "${PASS_ENV[@]}"; do [ -n "${!v:-}" ] && args+=(-e "$v"); done
  while IFS= read -r v; do args+=(-e "$v"); done < <(compgen -e | grep '^CVPIPE_SOURCE_' || true)
  # shellcheck disable=SC2207
  args+=($(gpu_flags "$stage"))
  # shellcheck disable=SC2206
  [ -n "${CVPIPE_DOCKER_ARGS:-}" ] && args+=(${CVPIPE_DOCKER_ARGS})
  if [ -t 0 ] && [ -t 1 ]; then args+=(-it); elif [ "$shell" = 1 ]; then args+=(-i); fi
  if [ "$shell" = 1 ]; then
    exec "$DOCKER" "${args[@]}" --entrypoint bash "$(image_of "$stage")" "$@"
  fi
  "$DOCKER" "${args[@]}" "$(image_of "$stage")" "$@"
}

[ $# -ge 1 ] || die "usage: docker-shell.sh <stage|all> [--shell|--build-only] [cvpipe args...]; stages: $(stages_with_dockerfile | tr '\n' ' ')"
target=$1; shift
shell=0; build_only=0
case "${1:-}" in
  --shell) shell=1; shift ;;
  --build-only) build_only=1; shift ;;
esac

if [ "$target" = all ]; then
  [ "$shell" = 0 ] || die "--shell needs one stage"
  if [ "${CVPIPE_NO_BUILD:-0}" != 1 ]; then
    for s in $(stages_with_dockerfile); do build "$s"; done
  fi
  [ "$build_only" = 1 ] && exit 0
  for s in "${PIPELINE[@]}"; do
    echo "docker-shell.sh: running $s" >&2
    run_stage "$s" 0 "$@"
  done
  exit 0
fi

if [ "$target" = compare ]; then
  # compare has no image of its own: it needs exactly what evaluate's image holds
  [ "${CVPIPE_NO_BUILD:-0}" = 1 ] || build evaluate
  [ "$build_only" = 1 ] && exit 0
  [ "$shell" = 1 ] && run_stage evaluate 1 "$@"
  CVPIPE_DOCKER_ARGS="${CVPIPE_DOCKER_ARGS:-} --entrypoint cvpipe" run_stage evaluate 0 compare "$@"
  exit $?
fi
[ -f "$REPO/$target/Dockerfile" ] || die "unknown stage '$target' (stages: $(stages_with_dockerfile | tr '\n' ' ')compare all)"
[ "${CVPIPE_NO_BUILD:-0}" = 1 ] || build "$target"
[ "$build_only" = 1 ] && exit 0
run_stage "$target" "$shell" "$@"
