import { build } from "esbuild";
import { gzipSync } from "node:zlib";
import { expect, it } from "vitest";

it("the core is at most 15 kB min+gzip, as an application ships it (with idb)", async () => {
  const bundle = await build({
    entryPoints: ["src/index.ts"],
    bundle: true,
    format: "esm",
    minify: true,
    write: false,
  });
  const bytes = gzipSync(bundle.outputFiles[0]!.contents, { level: 9 }).length;
  console.log(`core bundle: ${(bytes / 1024).toFixed(1)} kB min+gzip`);
  expect(bytes).toBeLessThanOrEqual(15 * 1024);
});
