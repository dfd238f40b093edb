/**
 * The package as an app installs it: the tarball `make client` builds, installed with npm into
 * a new app, which then type-checks (strict) and bundles for the browser against it.
 */
import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { build } from "esbuild";
import { afterAll, expect, it } from "vitest";

const dist = resolve(__dirname, "../../dist");
const app = mkdtempSync(join(tmpdir(), "pg-sync-app-"));
afterAll(() => rmSync(app, { recursive: true, force: true }));

/** An app's use of it, as the README shows it. */
const APP = `
import { createClient, type SyncClient } from "@pg-sync/client";
import { useLiveQuery } from "@pg-sync/client/react";

export async function start(token: string): Promise<SyncClient> {
  const client = createClient({ url: "https://sync.example.com", getToken: async () => token });
  const tasks = client.entity("task");
  await client.waitForFirstSync();
  tasks.where([{ column: "status", op: "eq", value: "open" }], { orderBy: { column: "updated_at", desc: true }, limit: 50 });
  tasks.subscribe([{ column: "project_id", op: "eq", value: "p1" }], (rows) => console.log(rows.length), { orderBy: "title", limit: 100 });
  await tasks.update(7, { status: "done" }, { expect: { status: "open" } });
  return client;
}
export { useLiveQuery };
`;

it("installs from its tarball into a new app, which type-checks and bundles for the browser", async () => {
  const tarball = readdirSync(dist).find((f) => f.endsWith(".tgz"));
  expect(tarball, "dist/*.tgz: run `make client` (npm run build) first").toBeDefined();
  writeFileSync(join(app, "package.json"), JSON.stringify({ name: "app", private: true, type: "module" }));
  // idb comes with it, as the package's dependency (from npm's cache when it has it).
  execFileSync("npm", ["install", "--prefer-offline", "--no-audit", "--no-fund", "--silent", join(dist, tarball!)], { cwd: app, stdio: ["ignore", "ignore", "inherit"] });
  expect(existsSync(join(app, "node_modules/idb/package.json"))).toBe(true);
  writeFileSync(join(app, "app.ts"), APP);
  writeFileSync(
    join(app, "tsconfig.json"),
    JSON.stringify({
      compilerOptions: { strict: true, noEmit: true, target: "es2022", module: "esnext", moduleResolution: "bundler", lib: ["es2022", "dom"], skipLibCheck: true },
      files: ["app.ts"],
    }),
  );
  // The package's own types, strict, as the app's compiler reads them (react is the app's
  // optional peer, not installed here: its types are not checked).
  execFileSync(process.execPath, [resolve(__dirname, "../../node_modules/typescript/bin/tsc"), "-p", app], { stdio: ["ignore", "inherit", "inherit"] });
  const out = join(app, "bundle.js");
  await build({ entryPoints: [join(app, "app.ts")], absWorkingDir: app, bundle: true, format: "esm", platform: "browser", external: ["react"], outfile: out, logLevel: "silent" });
  const bundle = readFileSync(out, "utf8");
  expect(bundle).toContain("indexedDB"); // idb, resolved from the app's node_modules and inside
  expect(bundle).not.toMatch(/from\s*["']idb["']/);
}, 120_000);
