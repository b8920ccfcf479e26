#!/usr/bin/env bash
# Regenerates libs/protos from protos/ with the pinned grpcio-tools and mypy-protobuf.
# Usage: scripts/genproto.sh [OUT_DIR]   (default libs/protos)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-libs/protos}"
py="${PYTHON:-.venv/bin/python}"
mkdir -p "$out"
# Generate into a scratch folder and swap it in, so a reader never sees a half-written tree.
tmp="$(mktemp -d "$out/.gen.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
final="$out"
out="$tmp"
mapfile -t files < <(find protos -name '*.proto' | sort)
"$py" -m grpc_tools.protoc -I protos \
  --python_out="$out" --grpc_python_out="$out" \
  --plugin=protoc-gen-mypy="$(dirname "$py")/protoc-gen-mypy" --mypy_out="$out" \
  --plugin=protoc-gen-mypy_grpc="$(dirname "$py")/protoc-gen-mypy_grpc" --mypy_grpc_out="$out" \
  "${files[@]}"
# Every generated sub-folder is a regular package so that imports and mypy agree;
# touchpoint/ stays a namespace package: libs/platform adds touchpoint.platform beside it.
find "$out/touchpoint" -mindepth 1 -type d -exec touch {}/__init__.py \;
rm -rf "$final/touchpoint"
mv "$out/touchpoint" "$final/touchpoint"
