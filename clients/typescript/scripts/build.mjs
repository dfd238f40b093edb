// The package (ES modules, `idb` left to the application's bundler) and the demo app that
// `make run` serves (dist/demo), with a blank page and the client as a script for the browser
// benchmark. The core's shipped size is checked by test/unit/size.test.ts.
import { build } from "esbuild";
import { copyFileSync, mkdirSync, writeFileSync } from "node:fs";

const common = { bundle: true, format: "esm", target: "es2022", logLevel: "warning" };
await build({ ...common, entryPoints: ["src/index.ts", "src/react.ts"], outdir: "dist", external: ["idb", "react"] });
mkdirSync("dist/demo", { recursive: true });
await build({ ...common, entryPoints: ["demo/app.ts"], outfile: "dist/demo/app.js", minify: true });
copyFileSync("demo/index.html", "dist/demo/index.html");
await build({ ...common, entryPoints: ["src/index.ts"], outfile: "dist/demo/client.js", format: "iife", globalName: "PgSync", minify: true });
writeFileSync("dist/demo/blank.html", '<!doctype html><meta charset="utf-8"><title>pg_sync client</title>\n');
