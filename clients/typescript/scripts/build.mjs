// The package's files (dist/), its tarball, and the demo app that `make run` serves:
// - dist/index.js, dist/react.js: ES modules for bundlers (`idb` and `react` imported, the
//   package's dependency and peer dependency), with their types in dist/types;
// - dist/pg-sync.js: the same ES module with `idb` inside, for `<script type="module">` or an
//   import map without a bundler;
// - dist/pg-sync.iife.js: the script-tag build, `window.PgSync`;
// - dist/pg-sync-client-<version>.tgz: what `npm install <that file>` installs (`npm pack`);
// - dist/demo/: the demo app, with a blank page and both browser builds for the browser tests
//   and the benchmark.
// The core's shipped size is checked by test/unit/size.test.ts.
import { build } from "esbuild";
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, readdirSync, rmSync, writeFileSync } from "node:fs";

const common = { bundle: true, format: "esm", target: "es2022", logLevel: "warning" };
await build({ ...common, entryPoints: ["src/index.ts", "src/react.ts"], outdir: "dist", external: ["idb", "react"] });
await build({ ...common, entryPoints: ["src/index.ts"], outfile: "dist/pg-sync.js", minify: true });
await build({ ...common, entryPoints: ["src/index.ts"], outfile: "dist/pg-sync.iife.js", format: "iife", globalName: "PgSync", minify: true });
mkdirSync("dist/demo", { recursive: true });
await build({ ...common, entryPoints: ["demo/app.ts"], outfile: "dist/demo/app.js", minify: true });
copyFileSync("demo/index.html", "dist/demo/index.html");
copyFileSync("dist/pg-sync.iife.js", "dist/demo/client.js");
copyFileSync("dist/pg-sync.js", "dist/demo/pg-sync.js");
writeFileSync("dist/demo/blank.html", '<!doctype html><meta charset="utf-8"><title>pg_sync client</title>\n');
for (const old of readdirSync("dist").filter((f) => f.endsWith(".tgz"))) rmSync(`dist/${old}`);
execFileSync("npm", ["pack", "--pack-destination", "dist", "--silent"], { stdio: ["ignore", "ignore", "inherit"] });
