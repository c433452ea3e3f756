#!/usr/bin/env bash
# Run the example client built by build.sh.
#
#   clients/go/run.sh OUT_DIR [--target HOST:PORT] --user-id U [--text T] [--k K] [--timeout-s S]
#                     [--feedback-user-id F]
#                     [--tls-ca FILE [--tls-cert FILE --tls-key FILE] [--token-file FILE]]
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 OUT_DIR [--target HOST:PORT] --user-id U [--text T] [--k K] [--timeout-s S] [--feedback-user-id F] [--tls-ca FILE [--tls-cert FILE --tls-key FILE] [--token-file FILE]]" >&2
  exit 2
fi
bin="$1/bertrec-example"
shift
if [[ ! -x "$bin" ]]; then
  echo "error: $bin not found; build it first: $(dirname "${BASH_SOURCE[0]}")/build.sh OUT_DIR" >&2
  exit 2
fi
# grpc-go before 1.40 (Debian 12 ships 1.33) applies the service config's retry policy only
# with this set; later versions retry by default and ignore it.
export GRPC_GO_RETRY="${GRPC_GO_RETRY:-on}"
exec "$bin" "$@"
