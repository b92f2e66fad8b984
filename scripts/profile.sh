#!/usr/bin/env bash
# Switch the pipeline to a params profile: `make profile P=smoke` (README, "Profiles").
#
#   default  params.yaml as committed (restored from git's HEAD)
#   tiny     params.tiny.yaml   the tiny model built here
#   smoke    params.smoke.yaml  tiny everything; its declared datasets (tests/fixtures/user) are
#                               copied to data/user/smoke and tracked with `dvc add`
#   gpu      params.gpu.yaml    8 GPUs (switching works; it does not run on CPU)
#
# The profile's file becomes params.yaml. A params.yaml with edits of its own (equal to no profile)
# is not overwritten unless FORCE=1. Any profile but smoke takes data/user/smoke away again
# (`dvc remove`), so `data/user`, a dependency of `prepare`, is as committed.
# An unknown profile changes nothing and exits 2.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILES="default tiny smoke gpu"
profile="${1:-}"
fail() { echo "profile: $*" >&2; exit 2; }

[ -n "$profile" ] || fail "name one: make profile P=<$(echo $PROFILES | tr ' ' '|')>"
case " $PROFILES " in
  *" $profile "*) ;;
  *) fail "unknown profile '$profile' (known: $PROFILES); nothing changed" ;;
esac

tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
if [ "$profile" = default ]; then
  git show HEAD:params.yaml >"$tmp" 2>/dev/null || fail "no params.yaml in git's HEAD to restore"
else
  [ -f "params.$profile.yaml" ] || fail "params.$profile.yaml: no such file"
  cp "params.$profile.yaml" "$tmp"
fi

# Never lose edits: params.yaml must be the committed default or one of the profiles' files.
if [ -f params.yaml ] && [ "${FORCE:-0}" != 1 ] && ! cmp -s params.yaml "$tmp"; then
  known=0
  if git show HEAD:params.yaml 2>/dev/null | cmp -s params.yaml -; then known=1; fi
  for other in params.*.yaml; do
    if cmp -s params.yaml "$other"; then known=1; fi
  done
  [ "$known" = 1 ] || fail "params.yaml has edits of its own (it is no profile's file): commit or copy it, or run again with FORCE=1 to overwrite it; nothing changed"
fi

FIXTURES=tests/fixtures/user
SMOKE=data/user/smoke
if [ "$profile" = smoke ]; then
  # The smoke profile's declared datasets (prepare.datasets), tracked as a user would (docs/datasets.md).
  if ! diff -rq "$FIXTURES" "$SMOKE" >/dev/null 2>&1; then
    rm -rf "$SMOKE"
    mkdir -p "$(dirname "$SMOKE")"
    cp -R "$FIXTURES" "$SMOKE"
  fi
  dvc add -q "$SMOKE"
  echo "profile: $SMOKE: the smoke datasets, tracked by $SMOKE.dvc"
elif [ -e "$SMOKE.dvc" ] || [ -e "$SMOKE" ]; then
  [ -e "$SMOKE.dvc" ] && dvc remove -q "$SMOKE.dvc"
  rm -rf "$SMOKE"
  echo "profile: $SMOKE removed (only the smoke profile reads it)"
fi

cp "$tmp" params.yaml
echo "profile: params.yaml is now the $profile profile$([ "$profile" = default ] || echo " (params.$profile.yaml)"); next: make repro"
