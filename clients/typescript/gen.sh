#!/usr/bin/env bash
# Regenerate the TypeScript stubs (ts-proto, grpc-js services) for bertrec.v1 and
# grpc.health.v1 into OUT_DIR, e.g. OUT_DIR/bertrec/v1/recommender.ts.
#
# The stubs are never committed: build.sh makes them from proto/ on every build, so they
# cannot drift from the API. buf and ts-proto come from this folder's node_modules
# (`npm ci`, which build.sh runs when needed).
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
buf="$here/node_modules/.bin/buf"

if ! command -v node >/dev/null 2>&1; then
  echo "missing toolchain: node (install: nodejs npm)" >&2
  exit 3
fi
if [[ ! -x "$buf" || ! -x "$here/node_modules/.bin/protoc-gen-ts_proto" ]]; then
  echo "missing toolchain: buf and ts-proto in $here/node_modules" \
    "(install: nodejs npm, then \`npm ci\` in clients/typescript)" >&2
  exit 3
fi

mkdir -p "$1"
out="$(cd "$1" && pwd)"

# buf keeps a module cache even when, as here, nothing is fetched; keep it out of $HOME.
cache="$(mktemp -d)"
trap 'rm -rf "$cache"' EXIT

# buf.gen.yaml names its inputs and plugin relative to this folder.
cd "$here"
BUF_CACHE_DIR="$cache" "$buf" generate --template buf.gen.yaml --output "$out"
