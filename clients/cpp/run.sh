#!/usr/bin/env bash
# Run the example client built by build.sh.
#
#   clients/cpp/run.sh OUT_DIR [--target HOST:PORT] --user-id U [--text T] [--k K] [--timeout-s S]
#                      [--feedback-user-id F]
#                      [--tls-ca FILE [--tls-cert FILE --tls-key FILE] [--token-file FILE]]
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 OUT_DIR [args...]" >&2
  exit 2
fi

bin="$1/bertrec-example"
shift
if [[ ! -x "$bin" ]]; then
  echo "error: $bin not found; build it first with clients/cpp/build.sh OUT_DIR" >&2
  exit 2
fi
exec "$bin" "$@"
