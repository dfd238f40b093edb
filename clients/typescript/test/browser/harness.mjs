// What the browser scenarios share: the line protocol with tests/tests/browser.rs (requests
// on stdout, answers on stdin), Chromium, the demo page, and reading a tab's state.
import { createInterface } from "node:readline";

const waiting = new Map();
let next = 1;
createInterface({ input: process.stdin }).on("line", (line) => {
  const { id, result, error } = JSON.parse(line);
  const call = waiting.get(id);
  waiting.delete(id);
  if (error !== undefined) call.reject(new Error(error));
  else call.resolve(result);
});

function call(name, ...args) {
  const id = next++;
  process.stdout.write(JSON.stringify({ id, call: name, args }) + "\n");
  return new Promise((resolve, reject) => waiting.set(id, { resolve, reject }));
}

/** Statements as the superuser. */
export const sql = (text) => call("sql", text);
/** Rows of a query as the superuser, as JSON. */
export const query = (text) => call("query", text);
/** A token for `sub` (valid an hour), with a `role` claim and other `claims` when given. */
export const token = (sub, role = null, claims = null) => call("token", sub, role, claims);
/** SIGKILLs the gateway and starts another on the same address. */
export const replaceGateway = () => call("replace_gateway");
/** SIGKILLs the gateway (its address refuses connections until `startGateway`). */
export const stopGateway = () => call("stop_gateway");
/** Starts the gateway again on the same address. */
export const startGateway = () => call("start_gateway");
export const metric = (name) => call("metric", name);
/** Runs `sql` (with `$1` a counter) at `rate` commits/s for `seconds`, each its own transaction. */
export const load = (sql, rate, seconds) => call("load", sql, rate, seconds);

export const GATEWAY = process.env.PG_SYNC_GATEWAY;
export const ARTIFACTS = process.env.PG_SYNC_ARTIFACTS ?? "../../target/browser";

export function log(...args) {
  console.log("  [browser]", ...args);
}

export { launch } from "./chromium.mjs";

/** A tab of `context` with the demo open as `sub`, once its first snapshot is in. */
export async function openDemo(context, sub) {
  const page = await context.newPage();
  page.on("console", (m) => m.type() === "warning" && log(`${sub} tab:`, m.text()));
  page.on("pageerror", (e) => log(`${sub} tab error:`, e.message));
  await page.goto(`${GATEWAY}/index.html#token=${await token(sub)}`);
  await page.waitForFunction(() => window.demo?.client && window.demo.tasks.all().length > 0, null, { timeout: 20000 });
  return page;
}

/**
 * A tab of `context` running the client from its script-tag build (`window.PgSync`, served
 * beside the demo) as `sub`, with `window.client`, `window.tasks`, and what its handlers
 * heard in `window.refusals` and `window.errors`. Only the first API is used here, so the
 * scenarios also run against the client before it (to see them fail there).
 */
export async function openClient(context, sub, { role = null, claims = null, getToken = false } = {}) {
  const page = await context.newPage();
  page.on("console", (m) => m.type() === "warning" && log(`${sub} tab:`, m.text()));
  page.on("pageerror", (e) => log(`${sub} tab error:`, e.message));
  await page.goto(`${GATEWAY}/blank.html`);
  await page.addScriptTag({ url: `${GATEWAY}/client.js` });
  await page.evaluate(
    ([t, getToken]) => {
      window.token = t;
      window.refusals = [];
      window.errors = [];
      window.client = window.PgSync.createClient({
        url: location.origin,
        ...(getToken ? { getToken: () => window.token } : { token: t }),
        onConflict: (r) => window.refusals.push(r),
        onRejected: (r) => window.refusals.push(r),
        onError: (e) => window.errors.push(String(e)),
      });
      window.tasks = window.client.entity("task");
    },
    [await token(sub, role, claims), getToken],
  );
  return page;
}

/** The database names of this tab's origin that are the client's. */
export function databases(page) {
  return page.evaluate(async () => (await indexedDB.databases()).map((d) => d.name).filter((n) => n.startsWith("pg-sync:")));
}

const FIELDS = ["id", "project_id", "title", "status", "assignee"];
const normal = (rows) =>
  rows
    .map((r) => FIELDS.map((f) => String(r[f] ?? "")).join("|"))
    .sort()
    .join("\n");

/** The tasks as the table has them (for `sub`'s eyes when `where` says so). */
export async function tableTasks(where = "true") {
  return normal(await query(`SELECT * FROM app.task WHERE ${where}`));
}

/** The tasks a tab shows (its view: server rows and pending writes). */
export async function tabTasks(page) {
  return normal(await page.evaluate(() => (window.demo?.tasks ?? window.tasks).all()));
}

/** The task rows stored in the tab's IndexedDB, read directly (not through the client). */
export async function storedTasks(page) {
  const rows = await page.evaluate(async () => {
    const names = (await indexedDB.databases()).map((d) => d.name).filter((n) => n.startsWith("pg-sync:"));
    const out = [];
    for (const name of names) {
      const db = await new Promise((resolve, reject) => {
        const open = indexedDB.open(name);
        open.onsuccess = () => resolve(open.result);
        open.onerror = () => reject(open.error);
      });
      const all = await new Promise((resolve) => {
        const request = db.transaction("rows").objectStore("rows").getAll(IDBKeyRange.bound(["task"], ["task", []]));
        request.onsuccess = () => resolve(request.result);
      });
      out.push(...all);
      db.close();
    }
    return out;
  });
  return normal(rows);
}

/** Waits until `check()` holds, polling; fails with `what` and the last values. */
export async function until(what, check, timeoutMs = 30000) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    last = await check();
    if (last === true) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(last)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Until every tab shows exactly the table's tasks. */
export async function converged(pages, where = "true") {
  await until("the tabs to equal the table", async () => {
    const table = await tableTasks(where);
    for (const page of pages) {
      const tab = await tabTasks(page);
      if (tab !== table) return { table, tab };
    }
    return true;
  });
}
