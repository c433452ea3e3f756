#!/usr/bin/env bash
# Regenerate the Python stubs (messages, gRPC stubs and .pyi type stubs) next to the .proto
# files, so `from bertrec.v1 import recommender_pb2` resolves through the package mapping.
# The Open Inference Protocol (proto package `inference`) is generated from
# bertrec/oip/v2/grpc_service.proto: protoc names modules after the file's path, not its
# package, so its stubs import as `bertrec.oip.v2` and no top-level `inference` module exists.
#
# Usage: scripts/gen_proto.sh   (uses $PYTHON, else .venv/bin/python, else python3)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi

"$python" -m grpc_tools.protoc \
  -Iproto \
  --python_out=proto \
  --pyi_out=proto \
  --grpc_python_out=proto \
  proto/bertrec/v1/*.proto proto/bertrec/oip/v2/*.proto

# Guard: every generated import must stay inside the bertrec namespace.
if grep -nE '^(from|import) inference\b' proto/bertrec/oip/v2/*_pb2*.py*; then
  echo "gen_proto: generated code imports a top-level 'inference' module" >&2
  exit 1
fi

echo "generated: $(ls proto/bertrec/v1/*_pb2*.py* proto/bertrec/oip/v2/*_pb2*.py* | tr '\n' ' ')"
