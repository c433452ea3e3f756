#!/usr/bin/env bash
# Regenerate the stubs from proto/ and build the example client into OUT_DIR.
#
#   clients/go/build.sh OUT_DIR      ->  OUT_DIR/bertrec-example, OUT_DIR/bertrec-loadgen
#
# Builds in GOPATH mode against Debian's Go sources in /usr/share/gocode, so it works offline
# and fetches nothing. Everything it writes goes under OUT_DIR, except Go's build cache
# (GOCACHE, by default ~/.cache/go-build), which makes rebuilds fast.
# Exit status 3 means a tool or Go library is missing; the last stderr line says which.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$1"
out="$(cd "$1" && pwd)" # absolute: GOPATH entries must be

missing() {
  echo "missing toolchain: $1 (install: $2)" >&2
  exit 3
}
gocode=/usr/share/gocode
command -v go >/dev/null 2>&1 || missing go golang-go
[[ -d "$gocode/src/google.golang.org/grpc" ]] ||
  missing "Go package google.golang.org/grpc" golang-google-grpc-dev
[[ -d "$gocode/src/google.golang.org/protobuf" ]] ||
  missing "Go package google.golang.org/protobuf" golang-google-protobuf-dev
# grpc-go 1.33 imports github.com/golang/protobuf, which Debian ships as 1.3 or 1.5. Only 1.4+
# (which has registry.go) is built on google.golang.org/protobuf, as the generated stubs need.
[[ -f "$gocode/src/github.com/golang/protobuf/proto/registry.go" ]] ||
  missing "Go package github.com/golang/protobuf 1.4+" golang-github-golang-protobuf-1-5-dev

# The GOPATH tree is rebuilt from scratch each time: it holds only generated code and a copy
# of cmd/, both derived from files in this repository.
gopath="$out/gopath"
cmds=(bertrec-example bertrec-loadgen)
rm -rf "$gopath"
bash "$here/gen.sh" "$gopath/src"
for cmd in "${cmds[@]}"; do
  mkdir -p "$gopath/src/bertrec.dev/clients/go/cmd/$cmd"
  cp "$here/cmd/$cmd/"*.go "$gopath/src/bertrec.dev/clients/go/cmd/$cmd/"
done
# The retry policy every bertrec client shares, embedded by the example's main.go (go:embed
# reads only files inside the package folder, and no symlinks).
cp "$here/../service_config.json" "$gopath/src/bertrec.dev/clients/go/cmd/bertrec-example/"

# GOPATH mode: our tree (generated stubs + example) first, then Debian's sources, which also
# provide the health stub google.golang.org/grpc/health/grpc_health_v1 (see gen.sh).
# No modules, no proxy, no user GOFLAGS.
export GO111MODULE=off GOPROXY=off GOFLAGS='' GOPATH="$gopath:$gocode"
# Without a C compiler, build pure Go (Go 1.20+ decides this by itself, 1.19 does not). With
# one, keep cgo: Debian's precompiled standard library then serves as is, halving a cold build.
if [[ -z "${CGO_ENABLED:-}" ]] && ! command -v "${CC:-gcc}" >/dev/null 2>&1; then
  export CGO_ENABLED=0
fi
# Go refuses to run without a cache; fall back to OUT_DIR when no home is known.
if [[ -z "${GOCACHE:-}${XDG_CACHE_HOME:-}${HOME:-}" ]]; then
  export GOCACHE="$out/gocache"
fi

for cmd in "${cmds[@]}"; do
  go build -o "$out/$cmd" "bertrec.dev/clients/go/cmd/$cmd"
  echo "built $out/$cmd" >&2
done
