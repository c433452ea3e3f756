#!/usr/bin/env bash
# Regenerate the Python stubs (messages, gRPC stubs and .pyi type stubs) next to the .proto
# files, so `from bertrec.v1 import recommender_pb2` resolves through the package mapping.
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
  proto/bertrec/v1/*.proto

echo "generated: $(ls proto/bertrec/v1/*_pb2*.py* | tr '\n' ' ')"
