#!/usr/bin/env bash
# Regenerate the stubs from proto/ and compile them with the example client into OUT_DIR.
#
# Usage: clients/java/build.sh OUT_DIR
#
# Layout of OUT_DIR (both folders are replaced on every build, so nothing stale survives):
#   OUT_DIR/generated/  Java sources made by protoc (see gen.sh)
#   OUT_DIR/classes/    compiled classes and clients/service_config.json; run.sh OUT_DIR runs them
#   OUT_DIR/sources.list  the files handed to javac
# Exits 3 with "missing toolchain: ..." on stderr when a tool or library is absent.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi

script_dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=classpath.sh
source "$script_dir/classpath.sh"

javac="${JAVAC:-$(command -v javac || true)}"
if [[ -z "$javac" || ! -x "$javac" ]]; then
  echo "missing toolchain: javac, JDK 17 or newer (install: openjdk-17-jdk-headless)" >&2
  exit 3
fi
# `javac -version` prints "javac 17.0.15" ("javac 1.8.0_392" before Java 9), possibly after a
# "Picked up JAVA_TOOL_OPTIONS" line, hence the regex rather than the first line.
javac_version="$("$javac" -version 2>&1 || true)"
if [[ ! "$javac_version" =~ javac\ ([0-9]+) ]] || ((BASH_REMATCH[1] < 17)); then
  echo "missing toolchain: javac 17 or newer, found '${javac_version//$'\n'/ }'" \
    "(install: openjdk-17-jdk-headless)" >&2
  exit 3
fi

# Checked before any work so a missing library reports exit 3 rather than a javac error
# (set -e passes the function's status on).
classpath="$(bertrec_java_classpath compile)"

mkdir -p -- "$1"
out="$(cd -- "$1" && pwd)"
rm -rf -- "$out/generated" "$out/classes" "$out/sources.list"
mkdir -p -- "$out/generated" "$out/classes"

bash "$script_dir/gen.sh" "$out/generated"

# Via a file rather than a process substitution, so a failing find stops the build.
find "$out/generated" "$script_dir/src/main/java" -name '*.java' -print0 >"$out/sources.list"
mapfile -d '' -t sources <"$out/sources.list"

# One javac run for generated and hand-written code: one JVM start. javac is itself a short job
# here, so C1-only JIT and the serial collector roughly halve its CPU time; -proc:none skips the
# scan of every jar for annotation processors. Every lint warning fails the build.
"$javac" \
  -J-XX:TieredStopAtLevel=1 \
  -J-XX:+UseSerialGC \
  -proc:none \
  --release 17 \
  -encoding UTF-8 \
  -Xlint:all \
  -Werror \
  -classpath "$classpath" \
  -d "$out/classes" \
  "${sources[@]}"

# The retry policy every bertrec client shares, read by Example as a class-path resource.
cp -- "$script_dir/../service_config.json" "$out/classes/dev/bertrec/example/service_config.json"

echo "built $out/classes" >&2
