#!/usr/bin/env bash
# Switch the pipeline to a params profile: `make profile P=smoke` (README, "Profiles").
#
#   default  profiles/default.yaml  params.yaml as it is
#   tiny     profiles/tiny.yaml     the tiny model built here
#   smoke    profiles/smoke.yaml    tiny everything; its declared datasets (tests/fixtures/user) are
#                                   copied to data/user/smoke and tracked with `dvc add`
#   gpu      profiles/gpu.yaml      8 GPUs (switching works; it does not run on CPU)
#
# A profile is an overlay: profiles/<name>.yaml holds only what differs from params.yaml, and the
# stages read params.yaml with it merged in (chatuie.config.params). Switching sets one line,
# params.yaml's `profile: <name>` (as `dvc exp run -S profile=<name>` would), so edits of your own
# in params.yaml are kept, and apply under every profile that does not set the same key. (FORCE=1,
# needed before to overwrite such edits, changes nothing now.) Any profile but smoke takes
# data/user/smoke away again (`dvc remove`), so `data/user`, a dependency of `prepare`, is as
# committed. An unknown profile changes nothing and exits 2.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILES="$(for f in profiles/*.yaml; do basename "$f" .yaml; done | tr '\n' ' ' | sed 's/ $//')"
profile="${1:-}"
fail() { echo "profile: $*" >&2; exit 2; }

[ -n "$profile" ] || fail "name one: make profile P=<$(echo $PROFILES | tr ' ' '|')>"
case " $PROFILES " in
  *" $profile "*) ;;
  *) fail "unknown profile '$profile' (known: $PROFILES: profiles/<name>.yaml); nothing changed" ;;
esac
[ -f params.yaml ] || fail "no params.yaml here; nothing changed"
# Exactly one top-level `profile:` line, the one line this changes.
[ "$(grep -c '^profile:' params.yaml)" = 1 ] \
  || fail "params.yaml needs one top-level 'profile: <name>' line (README \"Profiles\"); nothing changed"

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

# The value only, a comment after it kept: `profile: tiny   # ...` -> `profile: smoke   # ...`.
tmp="$(mktemp params.yaml.XXXXXX)"
trap 'rm -f "$tmp"' EXIT
sed -E "s/^profile:([[:space:]]*)[^[:space:]#]*/profile:\1$profile/" params.yaml >"$tmp"
cat "$tmp" >params.yaml
echo "profile: params.yaml's profile is now $profile (profiles/$profile.yaml over params.yaml); next: make repro"
