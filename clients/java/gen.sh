#!/usr/bin/env bash
# Generate the Java message classes and gRPC stubs for bertrec.v1 and grpc.health.v1 into OUT_DIR.
#
# Usage: clients/java/gen.sh OUT_DIR
#
# The generated code is never committed: it is rebuilt from proto/ on every build, so it cannot
# drift from the API. Exits 3 with "missing toolchain: ..." when protoc or the gRPC Java plugin
# is absent, or protobuf's well-known types (google/protobuf/*.proto). PROTOC, GRPC_JAVA_PLUGIN
# and PROTOC_INCLUDE override where those are found.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi

script_dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd -- "$script_dir/../.." && pwd)"

protoc="${PROTOC:-$(command -v protoc || true)}"
plugin="${GRPC_JAVA_PLUGIN:-$(command -v grpc_java_plugin || true)}"
if [[ -z "$protoc" || ! -x "$protoc" ]]; then
  echo "missing toolchain: protoc (install: protobuf-compiler)" >&2
  exit 3
fi
if [[ -z "$plugin" || ! -x "$plugin" ]]; then
  echo "missing toolchain: grpc_java_plugin (install: protobuf-compiler-grpc-java-plugin)" >&2
  exit 3
fi

# shellcheck source=../wkt_include.sh
source "$script_dir/../wkt_include.sh"
wkt="$(find_wkt "$protoc")" || exit 3

mkdir -p -- "$1"
out="$(cd -- "$1" && pwd)"

# Two import roots: the bertrec API, and the standard health protocol kept for non-Python clients.
"$protoc" \
  --proto_path="$root/proto" \
  --proto_path="$root/clients/proto" \
  --proto_path="$wkt" \
  --plugin=protoc-gen-grpc-java="$plugin" \
  --java_out="$out" \
  --grpc-java_out="$out" \
  bertrec/v1/recommender.proto \
  grpc/health/v1/health.proto
