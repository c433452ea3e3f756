#!/usr/bin/env bash
# Run the example client built by build.sh OUT_DIR:
#   run.sh OUT_DIR --user-id U [--target HOST:PORT] [--text T] [--k K] [--timeout-s S]
#          [--feedback-user-id F]
#          [--tls-ca FILE [--tls-cert FILE --tls-key FILE] [--token-file FILE]]
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 OUT_DIR [--target HOST:PORT] --user-id U [--text T] [--k K] [--timeout-s S] [--feedback-user-id F] [--tls-ca FILE [--tls-cert FILE --tls-key FILE] [--token-file FILE]]" >&2
  exit 2
fi
out="$1"
shift

if ! command -v node >/dev/null 2>&1; then
  echo "missing toolchain: node (install: nodejs)" >&2
  exit 3
fi
main="$out/dist/example.js"
if [[ ! -f "$main" ]]; then
  echo "error: $main not found; build it first: $(dirname "${BASH_SOURCE[0]}")/build.sh $out" >&2
  exit 2
fi
exec node "$main" "$@"
