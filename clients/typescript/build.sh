#!/usr/bin/env bash
# Build the TypeScript example client into OUT_DIR:
#   1. `npm ci` here when node_modules is missing or was not installed from package-lock.json,
#   2. fresh stubs from proto/ into OUT_DIR/src/gen (gen.sh), next to a copy of src/,
#   3. tsc into OUT_DIR/dist, plus clients/service_config.json (run it with run.sh OUT_DIR ...).
# OUT_DIR/node_modules links to this folder's node_modules for the runtime packages.
# Exit status 3 with "missing toolchain: ..." when node or npm is absent.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
min_node=20

missing() {
  echo "missing toolchain: $1 (install: $2)" >&2
  exit 3
}

command -v node >/dev/null 2>&1 || missing "node >= $min_node" "nodejs npm"
command -v npm >/dev/null 2>&1 || missing npm "npm"
node_version="$(node -p 'process.versions.node')"
if ((${node_version%%.*} < min_node)); then
  missing "node >= $min_node (found $node_version)" "nodejs >= $min_node, e.g. from Debian trixie"
fi

mkdir -p "$1"
out="$(cd "$1" && pwd)"
# OUT_DIR/src and OUT_DIR/dist are rebuilt from scratch: never let them be the sources.
if [[ "$here/" == "${out%/}/"* ]]; then
  echo "error: OUT_DIR ($out) must not contain $here" >&2
  exit 2
fi

"$here/install.sh"

rm -rf "$out/src" "$out/dist"
mkdir -p "$out/src"
# Only the hand-written sources: a local src/gen (editor stubs) must not shadow fresh ones.
cp "$here"/src/*.ts "$out/src/"
"$here/gen.sh" "$out/src/gen"

# Node and tsc resolve packages by walking up from each file; OUT_DIR may be anywhere.
rm -rf "$out/node_modules"
ln -s "$here/node_modules" "$out/node_modules"
# CommonJS whatever package.json sits above OUT_DIR (@grpc/grpc-js is a CommonJS package), and
# a tsconfig that extends ours with OUT_DIR's folders. node writes the JSON so any path is safe.
node - "$out" "$here/tsconfig.json" <<'JS'
const fs = require("node:fs");
const path = require("node:path");
const [out, base] = process.argv.slice(2);
const write = (name, value) =>
  fs.writeFileSync(path.join(out, name), `${JSON.stringify(value, null, 2)}\n`);
write("package.json", { private: true, type: "commonjs" });
write("tsconfig.json", {
  extends: base,
  compilerOptions: { rootDir: "./src", outDir: "./dist", noEmit: false },
  include: ["./src"],
});
JS

"$here/node_modules/.bin/tsc" --project "$out/tsconfig.json"
# The retry policy every bertrec client shares, read by example.js from its own folder.
cp "$here/../service_config.json" "$out/dist/service_config.json"
echo "build.sh: built $out/dist/example.js" >&2
