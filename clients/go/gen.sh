#!/usr/bin/env bash
# Regenerate the Go stubs of the bertrec API into OUT_DIR.
#
#   clients/go/gen.sh OUT_DIR
#
# Files land under OUT_DIR at their Go import path (the proto's go_package), so OUT_DIR is
# meant to be a GOPATH's src/ folder:
#   OUT_DIR/bertrec.dev/clients/go/gen/bertrec/v1/    package bertrecv1
# Generated code is never committed; build.sh runs this on every build so it cannot drift
# from proto/. Exit status 3 means a code generator or protobuf's well-known types are missing;
# PROTOC_INCLUDE names the folder holding google/protobuf/*.proto if it is not found.
#
# The health protocol (clients/proto/grpc/health/v1/health.proto) is deliberately not
# generated: grpc-go ships that exact API as google.golang.org/grpc/health/grpc_health_v1,
# the package every Go gRPC program imports. A second copy would register the same proto
# file twice (a panic at start-up in any binary that links both), and in GOPATH mode a
# partial google.golang.org/grpc tree in front of Debian's would hide the whole grpc module.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
out="$1"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

missing() {
  echo "missing toolchain: $1 (install: $2)" >&2
  exit 3
}
command -v protoc >/dev/null 2>&1 || missing protoc protobuf-compiler
command -v protoc-gen-go >/dev/null 2>&1 || missing protoc-gen-go protoc-gen-go
command -v protoc-gen-go-grpc >/dev/null 2>&1 || missing protoc-gen-go-grpc protoc-gen-go-grpc

# shellcheck source=../wkt_include.sh
source "$here/../wkt_include.sh"
wkt="$(find_wkt "$(command -v protoc)")" || exit 3

# Start from an empty package folder so a message or file removed from proto/ cannot linger.
rm -rf "$out/bertrec.dev/clients/go/gen"
mkdir -p "$out"

# proto/ is the include root so the file keeps its canonical name, bertrec/v1/recommender.proto,
# which is also the name it registers under in the protobuf registry (as in every language).
protoc \
  --proto_path="$root/proto" \
  --proto_path="$wkt" \
  --go_out="$out" \
  --go-grpc_out="$out" \
  bertrec/v1/recommender.proto
