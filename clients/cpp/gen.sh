#!/usr/bin/env bash
# Regenerate the C++ message and gRPC stubs from the .proto files into OUT_DIR.
#
#   clients/cpp/gen.sh OUT_DIR
#
# Generated code is never committed: it is rebuilt from proto/ on every build so it cannot
# drift from the API. Exits 3 when protoc, the gRPC C++ plugin or protobuf's well-known types
# (google/protobuf/*.proto, from libprotobuf-dev; PROTOC_INCLUDE names another folder) are not
# installed. The C++ code for those types is not generated: it is in libprotobuf.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$1"

missing() {
  echo "missing toolchain: $1 (install: $2)" >&2
  exit 3
}

command -v protoc >/dev/null 2>&1 || missing protoc protobuf-compiler
plugin="$(command -v grpc_cpp_plugin)" || missing grpc_cpp_plugin protobuf-compiler-grpc

# shellcheck source=../wkt_include.sh
source "$here/../wkt_include.sh"
wkt="$(find_wkt "$(command -v protoc)")" || exit 3

mkdir -p "$out"
# Import paths mirror the proto packages, so the headers land at bertrec/v1/... and
# grpc/health/v1/... under OUT_DIR.
protoc \
  -I "$root/proto" \
  -I "$root/clients/proto" \
  -I "$wkt" \
  --cpp_out="$out" \
  --grpc_out="$out" \
  --plugin=protoc-gen-grpc="$plugin" \
  "$root/proto/bertrec/v1/recommender.proto" \
  "$root/clients/proto/grpc/health/v1/health.proto"
