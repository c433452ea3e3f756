#!/usr/bin/env bash
# Regenerate the stubs and compile the example client into OUT_DIR.
#
#   clients/cpp/build.sh OUT_DIR
#
# Produces OUT_DIR/bertrec-example; writes nothing outside OUT_DIR. Exits 3 with
# "missing toolchain: ..." when a compiler, protoc, the gRPC plugin or the gRPC/protobuf
# development files are not installed. Environment: CXX (default g++), JOBS (parallel
# compiles, default: the number of CPUs, at most 4).
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

missing() {
  echo "missing toolchain: $1 (install: $2)" >&2
  exit 3
}

# Check every tool before doing any work, so a missing one is reported as such.
cxx="${CXX:-g++}"
command -v "$cxx" >/dev/null 2>&1 || missing "C++ compiler ($cxx)" g++
command -v protoc >/dev/null 2>&1 || missing protoc protobuf-compiler
command -v grpc_cpp_plugin >/dev/null 2>&1 || missing grpc_cpp_plugin protobuf-compiler-grpc
command -v pkg-config >/dev/null 2>&1 || missing pkg-config pkg-config
pkg-config --exists grpc++ protobuf ||
  missing "grpc++ and protobuf development files" "libgrpc++-dev libprotobuf-dev"

mkdir -p "$1"
out="$(cd "$1" && pwd)"
gen="$out/gen"
obj="$out/obj"

# Start from a clean slate so no stale stub or object from an older proto survives.
rm -rf "$gen" "$obj"
mkdir -p "$obj"
"$here/gen.sh" "$gen"
# The retry policy every bertrec client shares, as a raw string literal that example.cc
# includes (the JSON holds no ')json"', the only sequence that would end it early).
{
  printf 'R"json('
  cat "$here/../service_config.json"
  printf ')json"\n'
} >"$gen/service_config.inc"

# pkg-config prints space-separated flags; splitting them into words is intended. Captured
# first so a pkg-config failure stops the build (set -e) rather than being masked.
cflags_str="$(pkg-config --cflags grpc++ protobuf)"
libs_str="$(pkg-config --libs grpc++ protobuf)"
read -r -a cflags <<<"$cflags_str"
read -r -a libs <<<"$libs_str"
cxxflags=(-std=c++17 -O1 -pthread -I "$gen" -I "$here" "${cflags[@]}")

jobs="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
if ((jobs > 4)); then jobs=4; fi

# Compile the four generated sources and the example in parallel; each object is named
# after its source's basename, which is unique here. xargs exits non-zero if any fails.
(
  cd "$obj"
  printf '%s\0' \
    "$gen/bertrec/v1/recommender.pb.cc" \
    "$gen/bertrec/v1/recommender.grpc.pb.cc" \
    "$gen/grpc/health/v1/health.pb.cc" \
    "$gen/grpc/health/v1/health.grpc.pb.cc" \
    "$here/example.cc" |
    xargs -0 -n 1 -P "$jobs" "$cxx" "${cxxflags[@]}" -Wall -Wextra -c
)

"$cxx" -pthread -o "$out/bertrec-example" "$obj"/*.o "${libs[@]}"
echo "built $out/bertrec-example" >&2
