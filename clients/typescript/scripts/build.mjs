// The package (ES modules, `idb` left to the application's bundler) and the demo app that
// `make run` serves (dist/demo). The core's shipped size is checked by test/unit/size.test.ts.
import { build } from "esbuild";
import { copyFileSync, mkdirSync } from "node:fs";

const common = { bundle: true, format: "esm", target: "es2022", logLevel: "warning" };
await build({ ...common, entryPoints: ["src/index.ts", "src/react.ts"], outdir: "dist", external: ["idb", "react"] });
mkdirSync("dist/demo", { recursive: true });
await build({ ...common, entryPoints: ["demo/app.ts"], outfile: "dist/demo/app.js", minify: true });
copyFileSync("demo/index.html", "dist/demo/index.html");
