# Sourced by clients/{go,java,cpp}/gen.sh: `find_wkt PROTOC` prints the folder holding
# protobuf's well-known types, or reports the package that provides them and returns 3.
#
# The API imports google/protobuf/timestamp.proto. Debian ships that file with libprotobuf-dev,
# not with protoc, and only a protoc that finds it next to itself (../include) looks there
# unasked; so find its folder here and name it. PROTOC_INCLUDE=DIR names another folder.
find_wkt() {
  local dir
  for dir in "${PROTOC_INCLUDE:-}" "$(dirname "$(readlink -f "$1")")/../include" \
    /usr/include /usr/local/include; do
    if [[ -n "$dir" && -f "$dir/google/protobuf/timestamp.proto" ]]; then
      (cd "$dir" && pwd)
      return 0
    fi
  done
  echo "missing toolchain: google/protobuf/timestamp.proto, protobuf's well-known types" \
    "(install: libprotobuf-dev)" >&2
  return 3
}
