// The browser scenarios: each takes a launched Chromium and throws when what it names does not
// hold. Tabs of one context share IndexedDB, Web Locks and BroadcastChannel, as tabs of one
// browser profile do.
import assert from "node:assert/strict";
import { appendFileSync, mkdirSync } from "node:fs";
import {
  ARTIFACTS,
  converged,
  GATEWAY,
  load,
  log,
  metric,
  openDemo,
  query,
  replaceGateway,
  sql,
  storedTasks,
  tableTasks,
  tabTasks,
  token,
  until,
} from "./harness.mjs";

/** A small seeded generator, so that a failure can be replayed (PG_SYNC_SEED). */
function random(seed = Number(process.env.PG_SYNC_SEED ?? Date.now() % 100000)) {
  log(`seed ${seed}`);
  let s = seed;
  return (n) => {
    s = (s * 1103515245 + 12345) % 2147483648;
    return s % n;
  };
}

const STATUSES = ["open", "blocked", "done"];

/** A write from a tab, through the client. */
function tabWrite(page, op, id, title) {
  return page.evaluate(
    ([op, id, title]) => {
      const { tasks } = window.demo;
      if (op === "insert") return tasks.insert({ id, project_id: "p1", title, status: "open", assignee: "alice" });
      if (op === "delete") return tasks.delete(String(id));
      return tasks.update(String(id), { title, status: ["open", "blocked", "done"][id % 3] });
    },
    [op, id, title],
  );
}

/** Ids of the tasks that exist now. */
async function taskIds() {
  return (await query("SELECT id FROM app.task ORDER BY id")).map((r) => Number(r.id));
}

export async function two_tabs_converge(browser) {
  const context = await browser.newContext();
  const [a, b] = [await openDemo(context, "alice"), await openDemo(context, "alice")];
  const pick = random();
  let nextId = 1000;
  for (let step = 0; step < 60; step++) {
    const ids = await taskIds();
    const id = ids[pick(ids.length)] ?? 1;
    const op = ids.length < 3 ? "insert" : ["insert", "update", "delete"][pick(3)];
    const title = `step ${step}`;
    const source = pick(3);
    if (source === 2) {
      if (op === "insert") await sql(`INSERT INTO app.task (id, project_id, title) VALUES (${nextId++}, 'p2', '${title}')`);
      else if (op === "delete") await sql(`DELETE FROM app.task WHERE id = ${id}`);
      else await sql(`UPDATE app.task SET title = '${title}', status = '${STATUSES[step % 3]}' WHERE id = ${id}`);
    } else {
      await tabWrite(source === 0 ? a : b, op, op === "insert" ? nextId++ : id, title);
    }
  }
  await converged([a, b]);
  // What each tab stored equals the table too (the leader writes, both read it).
  assert.equal(await storedTasks(a), await tableTasks());
  const refusals = await a.evaluate(() => window.demo.refusals.length + 0);
  log(`converged after 60 random writes (${refusals} refused as conflicting)`);
}

export async function offline_writes(browser) {
  const context = await browser.newContext();
  const [a, b] = [await openDemo(context, "alice"), await openDemo(context, "alice")];
  await context.setOffline(true);
  const written = [];
  for (let i = 0; i < 5; i++) {
    await tabWrite(a, "insert", 2000 + i, `offline a ${i}`);
    await tabWrite(b, "insert", 3000 + i, `offline b ${i}`);
    written.push(2000 + i, 3000 + i);
  }
  await tabWrite(a, "update", 1, "renamed offline");
  assert.equal(await b.evaluate(() => window.demo.client.pendingWrites), 11);
  assert.equal(await query("SELECT id FROM app.task WHERE id >= 2000").then((r) => r.length), 0);
  // Back online, and the first tab is reloaded at once, its writes perhaps in flight.
  await context.setOffline(false);
  await a.reload();
  await a.waitForFunction(() => window.demo?.client, null, { timeout: 20000 });
  await until("the outbox to drain", async () => (await b.evaluate(() => window.demo.client.pendingWrites)) === 0 || "pending");
  await converged([a, b]);
  const rows = await query(`SELECT id FROM app.task WHERE id IN (${written.join(",")})`);
  assert.equal(rows.length, written.length, "every offline insert is in the table");
  // Each mutation id was claimed once; none was refused (a second INSERT would be).
  const claimed = await query("SELECT count(*)::int AS n FROM sync.applied_mutation WHERE user_id = 'alice'");
  assert.equal(claimed[0].n, 11);
  const refused = (await a.evaluate(() => window.demo.refusals.length)) + (await b.evaluate(() => window.demo.refusals.length));
  assert.equal(refused, 0, "no write was refused");
  assert.equal((await query("SELECT title FROM app.task WHERE id = 1"))[0].title, "renamed offline");
}

export async function gateway_killed(browser) {
  const context = await browser.newContext();
  const page = await openDemo(context, "alice");
  // Every title task 1 shows, in order: a resumed stream must not go back or skip ahead wrongly.
  await page.evaluate(() => {
    window.seen = [];
    window.demo.tasks.subscribe(undefined, () => {
      const title = window.demo.tasks.get("1")?.title;
      if (window.seen.at(-1) !== title) window.seen.push(title);
    });
  });
  for (let i = 1; i <= 40; i++) {
    await sql(`UPDATE app.task SET title = 'v${i}' WHERE id = 1; INSERT INTO app.task (id, project_id, title) VALUES (${5000 + i}, 'p1', 'row ${i}')`);
    if (i === 20) {
      await replaceGateway();
      log("the gateway was killed and replaced");
    }
  }
  await converged([page]);
  const seen = await page.evaluate(() => window.seen.filter((t) => /^v\d+$/.test(t)).map((t) => Number(t.slice(1))));
  assert.ok(seen.every((v, i) => i === 0 || v > seen[i - 1]), `task 1 went back: ${seen}`);
  assert.equal(seen.at(-1), 40);
}

export async function leader_hands_over(browser) {
  const context = await browser.newContext();
  const a = await openDemo(context, "alice");
  const b = await openDemo(context, "alice");
  await until("one socket for the two tabs", async () => (await metric("sync_connections")) === 1 || "not one");
  const closed = Date.now();
  await a.close();
  await sql("UPDATE app.task SET title = 'after the leader left' WHERE id = 2");
  await until("the other tab to take over", async () =>
    (await b.evaluate(() => window.demo.tasks.get("2")?.title)) === "after the leader left" || "not yet",
  );
  log(`handed over and delivered ${Date.now() - closed} ms after the leader tab closed`);
  assert.equal(await metric("sync_connections"), 1);
  // The new leader drains writes too.
  await tabWrite(b, "update", 3, "written by the new leader");
  await converged([b]);
}

export async function conflict(browser) {
  const context = await browser.newContext();
  const page = await openDemo(context, "alice");
  await sql("UPDATE app.task SET title = 'changed on the server' WHERE id = 1");
  await until("the server's title", async () => (await page.evaluate(() => window.demo.tasks.get("1")?.title)) === "changed on the server" || "not yet");
  const id = await page.evaluate(() =>
    window.demo.tasks.update("1", { title: "mine" }, { expect: { title: "Write the announcement" } }),
  );
  await until("the conflict to be reported", async () => (await page.evaluate(() => window.demo.refusals.length)) > 0 || "none");
  const refusal = await page.evaluate(() => window.demo.refusals[0]);
  assert.equal(refusal.status, 409);
  assert.equal(refusal.mutation.id, id);
  assert.equal(refusal.current.title, "changed on the server");
  // Rolled back: the server's row shows, and nothing is left to send.
  assert.equal(await page.evaluate(() => window.demo.tasks.get("1")?.title), "changed on the server");
  assert.equal(await page.evaluate(() => window.demo.client.pendingWrites), 0);
  assert.equal((await query("SELECT title FROM app.task WHERE id = 1"))[0].title, "changed on the server");
}

export async function rls(browser) {
  const context = await browser.newContext();
  const page = await openDemo(context, "bob");
  await sql("INSERT INTO app.task (id, project_id, title, assignee) VALUES (7001, 'p1', 'for alice', 'alice')");
  await sql("INSERT INTO app.task (id, project_id, title, assignee) VALUES (7002, 'p1', 'for bob', 'bob')");
  // Once bob's later row is in, alice's earlier one has been passed over.
  await until("bob's new task", async () => (await page.evaluate(() => window.demo.tasks.get("7002")?.title)) === "for bob" || "not yet");
  const bobs = await tableTasks("assignee = 'bob'");
  assert.equal(await tabTasks(page), bobs);
  assert.equal(await storedTasks(page), bobs, "IndexedDB holds bob's rows and nothing else");
}

export async function demo_screenshot(browser) {
  const context = await browser.newContext({ viewport: { width: 1000, height: 600 } });
  const page = await openDemo(context, "alice");
  await sql("INSERT INTO app.task (id, project_id, title, status, assignee) VALUES (9001, 'p2', 'Written in SQL', 'blocked', 'carol')");
  const card = page.locator('section[data-status="blocked"] .card', { hasText: "Written in SQL · carol" });
  await card.waitFor({ timeout: 20000 });
  await page.locator("#status.live").waitFor({ timeout: 20000 });
  mkdirSync(ARTIFACTS, { recursive: true });
  const png = await page.screenshot({ path: `${ARTIFACTS}/demo.png` });
  assert.ok(png.length > 10000, "the screenshot shows a board");
  const columns = await page.evaluate(() =>
    Object.fromEntries([...document.querySelectorAll("section")].map((s) => [s.dataset.status, [...s.querySelectorAll(".card span")].map((e) => e.textContent)])),
  );
  assert.deepEqual(columns, {
    open: ["Write the announcement · alice"],
    blocked: ["Check the numbers · bob", "Written in SQL · carol"],
    done: ["Plant tomatoes · bob"],
  });
  log(`screenshot: ${ARTIFACTS}/demo.png`);
}

/** `make bench`: hydration of the 100,003 tasks (until the first live query has them all) and
 * commit → callback latency of live queries at 1,000 commits/s, into $BENCH_OUT/results.jsonl. */
export async function bench(browser) {
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(`${GATEWAY}/blank.html`);
  await page.addScriptTag({ url: `${GATEWAY}/client.js` });
  const rows = (await query("SELECT count(*)::int AS n FROM app.task"))[0].n;
  // The reference: the same snapshot fetched and parsed in the page, stored nowhere.
  const fetchMs = await page.evaluate(async (token) => {
    const started = performance.now();
    const response = await fetch("/v1/snapshot/task", { headers: { authorization: `Bearer ${token}` } });
    const lines = (await response.text()).split("\n").filter(Boolean).map((l) => JSON.parse(l));
    if (lines.length < 2) throw new Error("empty snapshot");
    return performance.now() - started;
  }, await token("alice"));
  const hydrationMs = await page.evaluate(
    async ([token, rows]) => {
      const started = performance.now();
      window.client = window.PgSync.createClient({ url: location.origin, token });
      const tasks = window.client.entity("task");
      await new Promise((resolve) => tasks.subscribe(undefined, (all) => all.length >= rows && resolve()));
      return performance.now() - started;
    },
    [await token("alice"), rows],
  );
  log(`hydration: ${rows} rows in ${hydrationMs.toFixed(0)} ms (fetch and parse alone ${fetchMs.toFixed(0)} ms)`);
  // Latency: each commit stamps a tick row with its time; the page notes when it sees it.
  await page.evaluate(() => {
    window.samples = [];
    const seen = new Map();
    const ticks = window.client.entity("tick");
    ticks.subscribe(undefined, (all) => {
      const now = Date.now();
      for (const row of all) {
        const at = Number(row.at_ms);
        if (at && seen.get(row.id) !== at) {
          seen.set(row.id, at);
          window.samples.push(now - at);
        }
      }
    });
  });
  await page.waitForFunction(() => window.client.status === "live", null, { timeout: 30000 });
  const seconds = Number(process.env.BENCH_SECONDS ?? 10);
  await load("UPDATE app.tick SET at_ms = (extract(epoch FROM clock_timestamp()) * 1000)::bigint WHERE id = $1 % 100 + 1", 1000, seconds);
  let count = -1;
  await until("the last ticks", async () => {
    const now = await page.evaluate(() => window.samples.length);
    const settled = now === count;
    count = now;
    return settled || now;
  });
  const samples = (await page.evaluate(() => window.samples)).sort((a, b) => a - b);
  const at = (q) => samples[Math.min(samples.length - 1, Math.floor(q * samples.length))];
  const result = {
    mode: "browser",
    hydration_rows: rows,
    hydration_seconds: hydrationMs / 1000,
    hydration_rows_per_s: rows / (hydrationMs / 1000),
    fetch_parse_rows_per_s: rows / (fetchMs / 1000),
    rate: 1000,
    commits: 1000 * seconds,
    samples: samples.length,
    p50_ms: at(0.5),
    p99_ms: at(0.99),
    max_ms: samples.at(-1),
  };
  log(JSON.stringify(result));
  if (process.env.BENCH_OUT) appendFileSync(`${process.env.BENCH_OUT}/results.jsonl`, JSON.stringify(result) + "\n");
}
