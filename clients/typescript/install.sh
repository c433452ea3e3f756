#!/usr/bin/env bash
# `npm ci` in this folder when node_modules was not installed from the current
# package-lock.json; the one install step of build.sh and scripts/ci-deps.sh.
#
# The stamp holds a hash of the package-lock.json it was installed from (content, not mtime:
# git checkouts do not keep mtimes). Install scripts are skipped: none is needed (buf's only
# checks that npm installed its platform binary package, which bin/buf finds by itself).
# Progress goes to stderr, so callers' stdout stays clean.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
stamp="$here/node_modules/.ci-deps-stamp"
want="$(sha256sum "$here/package-lock.json" | cut -c1-16)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [[ "$have" == "$want" ]]; then
  echo "install.sh: $here/node_modules is up to date" >&2
  exit 0
fi
echo "install.sh: npm ci in $here" >&2
(cd "$here" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error) >&2
printf '%s\n' "$want" >"$stamp"
