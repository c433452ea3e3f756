#!/usr/bin/env bash
# Run the example client built by build.sh.
#
# Usage: clients/java/run.sh OUT_DIR [--target HOST:PORT] --user-id U [--text T] [--k K] [--timeout-s S]
#                            [--feedback-user-id F]
#                            [--tls-ca FILE [--tls-cert FILE --tls-key FILE] [--token-file FILE]]
#
# Prints one JSON document on stdout; logs and errors go to stderr. Extra JVM options can be
# passed in JAVA_OPTS (split on whitespace).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 OUT_DIR [args...]" >&2
  exit 2
fi

script_dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=classpath.sh
source "$script_dir/classpath.sh"

out="$1"
shift
if [[ ! -f "$out/classes/dev/bertrec/example/Example.class" ]]; then
  echo "error: no built client in '$out'; run $script_dir/build.sh '$out' first" >&2
  exit 2
fi

java="${JAVA:-$(command -v java || true)}"
if [[ -z "$java" || ! -x "$java" ]]; then
  echo "missing toolchain: java, JRE 17 or newer (install: openjdk-17-jre-headless)" >&2
  exit 3
fi
classpath="$(bertrec_java_classpath runtime)"

# The JVM decodes argv with the locale's charset; under C/POSIX non-ASCII --text or --user-id
# would arrive mangled, so pick a UTF-8 locale unless one is already set.
case "${LC_ALL:-${LC_CTYPE:-${LANG:-}}}" in
  *[Uu][Tt][Ff]-8* | *[Uu][Tt][Ff]8*) ;;
  *) export LC_ALL=C.UTF-8 ;;
esac

java_opts=()
if [[ -n "${JAVA_OPTS:-}" ]]; then
  read -r -a java_opts <<<"$JAVA_OPTS"
fi

# A short-lived CLI: C1 only and the serial collector start faster than the server defaults.
exec "$java" \
  -XX:TieredStopAtLevel=1 \
  -XX:+UseSerialGC \
  "${java_opts[@]}" \
  -classpath "$out/classes:$classpath" \
  dev.bertrec.example.Example "$@"
