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

# The API imports google/protobuf/timestamp.proto. Debian ships that file with libprotobuf-dev,
# not with protoc, and only a protoc that finds it next to itself (../include) looks there
# unasked; so find its folder here and name it, or report the package that provides it.
wkt_include() {
  local dir
  for dir in "${PROTOC_INCLUDE:-}" "$(dirname "$(readlink -f "$1")")/../include" \
    /usr/include /usr/local/include; do
    if [[ -n "$dir" && -f "$dir/google/protobuf/timestamp.proto" ]]; then
      (cd "$dir" && pwd)
      return 0
    fi
  done
  return 1
}
if ! wkt="$(wkt_include "$protoc")"; then
  echo "missing toolchain: google/protobuf/timestamp.proto, protobuf's well-known types" \
    "(install: libprotobuf-dev)" >&2
  exit 3
fi

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
