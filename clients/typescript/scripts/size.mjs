// The core's size as an application ships it: bundled with idb, minified, gzipped.
import { build } from "esbuild";
import { gzipSync } from "node:zlib";

export async function coreSize() {
  const bundle = await build({ entryPoints: ["src/index.ts"], bundle: true, format: "esm", minify: true, write: false });
  return gzipSync(bundle.outputFiles[0].contents, { level: 9 }).length;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  console.log(JSON.stringify({ mode: "client_size", core_min_gzip_bytes: await coreSize() }));
}
