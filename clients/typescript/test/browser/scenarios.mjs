// The browser scenarios: each takes a launched Chromium and throws when what it names does not
// hold. Tabs of one context share IndexedDB, Web Locks and BroadcastChannel, as tabs of one
// browser profile do.
import assert from "node:assert/strict";
import { appendFileSync, mkdirSync } from "node:fs";
import {
  ARTIFACTS,
  converged,
  databases,
  GATEWAY,
  load,
  log,
  metric,
  openClient,
  openDemo,
  query,
  replaceGateway,
  sql,
  startGateway,
  stopGateway,
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
  // What each tab stored equals the table too (the leader writes, both read it). Storage
  // follows memory (commits are written behind), so it may take a moment longer: a `make
  // test` run read it one IndexedDB write before it held the last delete.
  await until("what the tabs stored to equal the table", async () => (await storedTasks(a)) === (await tableTasks()) || "not yet", 10000);
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
  // The other tab learns of the outbox's growth a moment later (through IndexedDB).
  await until("tab b to count 11 pending writes", async () => {
    const pending = await b.evaluate(() => window.demo.client.pendingWrites);
    return pending === 11 || `${pending} pending`;
  });
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
  // Storage follows memory: once it holds bob's rows, nothing else is there.
  await until("IndexedDB to hold bob's rows", async () => (await storedTasks(page)) === bobs || storedTasks(page), 10000);
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

/** In the page: records the main thread's longest task (the longest gap between turns of a
 * MessageChannel loop, which runs whenever the thread is free) until `window.stopWatch()`. */
function watchMainThread() {
  const channel = new MessageChannel();
  let last = performance.now();
  let running = true;
  window.longestTask = 0;
  channel.port1.onmessage = () => {
    const now = performance.now();
    window.longestTask = Math.max(window.longestTask, now - last);
    last = now;
    if (running) channel.port2.postMessage(0);
  };
  channel.port2.postMessage(0);
  window.stopWatch = () => (running = false);
}

/** The JavaScript heap a page uses after a full collection, in bytes. */
async function heap(page) {
  const cdp = await page.context().newCDPSession(page);
  await cdp.send("HeapProfiler.collectGarbage");
  const { usedSize } = await cdp.send("Runtime.getHeapUsage");
  await cdp.detach();
  return usedSize;
}

/** A blank page of the gateway with the script-tag build loaded. */
async function blankPage(context) {
  const page = await context.newPage();
  await page.goto(`${GATEWAY}/blank.html`);
  await page.addScriptTag({ url: `${GATEWAY}/client.js` });
  return page;
}

/** Hydration of `rows` tasks in a new profile until the first live query has them all; the
 * main thread's longest task meanwhile. */
async function hydrate(browser, rows, worker) {
  const context = await browser.newContext();
  const page = await blankPage(context);
  const result = await page.evaluate(
    async ([token, rows, worker, watch]) => {
      eval(`(${watch})()`);
      const started = performance.now();
      window.client = window.PgSync.createClient({ url: location.origin, token, worker });
      const tasks = window.client.entity("task");
      await new Promise((resolve) => tasks.subscribe(undefined, (all) => all.length >= rows && resolve()));
      const ms = performance.now() - started;
      window.stopWatch();
      return { ms, longestTask: window.longestTask };
    },
    [await token("alice"), rows, worker, String(watchMainThread)],
  );
  return { context, page, ...result };
}

/** `make bench`: hydration of the 100,003 tasks (until the first live query has them all, with
 * the snapshot stored from a worker and from the page), the main thread's longest task, the
 * heap of a follower tab holding them, and commit → callback latency of live queries at
 * 1,000 commits/s beside the same run's socket latency, into $BENCH_OUT/results.jsonl. */
export async function bench(browser) {
  const reference = await blankPage(await browser.newContext());
  const rows = (await query("SELECT count(*)::int AS n FROM app.task"))[0].n;
  // The reference: the same snapshot fetched and parsed in the page, stored nowhere.
  const fetchMs = await reference.evaluate(async (token) => {
    const started = performance.now();
    const response = await fetch("/v1/snapshot/task", { headers: { authorization: `Bearer ${token}` } });
    const lines = (await response.text()).split("\n").filter(Boolean).map((l) => JSON.parse(l));
    if (lines.length < 2) throw new Error("empty snapshot");
    return performance.now() - started;
  }, await token("alice"));
  const inPage = await hydrate(browser, rows, false);
  log(`hydration, stored from the page: ${rows} rows in ${inPage.ms.toFixed(0)} ms, longest task ${inPage.longestTask.toFixed(0)} ms`);
  await inPage.context.close();
  const { context, page, ms: hydrationMs, longestTask } = await hydrate(browser, rows, true);
  log(`hydration: ${rows} rows in ${hydrationMs.toFixed(0)} ms, longest task ${longestTask.toFixed(0)} ms (fetch and parse alone ${fetchMs.toFixed(0)} ms)`);
  // A follower tab that shows the tasks, and one that opened no entity: their heaps.
  await until("the rows stored", async () => (await page.evaluate(() => window.client.syncStatus.hasSynced)) || "not yet");
  const follower = await blankPage(context);
  const bare = await heap(follower);
  await follower.evaluate(async (token) => {
    window.client = window.PgSync.createClient({ url: location.origin, token });
    await window.client.ready;
  }, await token("alice"));
  const idle = await heap(follower);
  await follower.evaluate(async (rows) => {
    const tasks = window.client.entity("task");
    await window.client.waitForFirstSync();
    if (tasks.all().length < rows) throw new Error(`the follower holds ${tasks.all().length} rows`);
  }, rows);
  const holding = await heap(follower);
  log(`follower heap: ${(bare / 2 ** 20).toFixed(1)} MiB bare, ${(idle / 2 ** 20).toFixed(1)} MiB with a client, ${(holding / 2 ** 20).toFixed(1)} MiB holding ${rows} tasks`);
  await follower.close();
  // Latency: each commit stamps a tick row with its time; the page notes when its socket
  // received it and when a live query saw it.
  await page.evaluate(() => {
    window.samples = [];
    window.socketSamples = [];
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
  // The socket's own latency in the same run: the client's socket is replaced by one that
  // notes each tick's arrival before the client sees it (the next connection uses it).
  await page.evaluate(() => {
    const Socket = window.WebSocket;
    window.WebSocket = class extends Socket {
      constructor(...args) {
        super(...args);
        this.addEventListener("message", (event) => {
          if (!event.data.includes('"tick"')) return;
          const now = Date.now();
          const message = JSON.parse(event.data);
          for (const change of message.payload?.changes ?? []) if (change.data?.at_ms) window.socketSamples.push(now - Number(change.data.at_ms));
        });
      }
    };
  });
  await page.waitForFunction(() => window.client.status === "live", null, { timeout: 30000 });
  await replaceGateway(); // the client reconnects through the noting socket
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
  const sorted = (xs) => [...xs].sort((a, b) => a - b);
  const samples = sorted(await page.evaluate(() => window.samples));
  const socket = sorted(await page.evaluate(() => window.socketSamples));
  const at = (xs, q) => xs[Math.min(xs.length - 1, Math.floor(q * xs.length))];
  const result = {
    mode: "browser",
    hydration_rows: rows,
    hydration_seconds: hydrationMs / 1000,
    hydration_rows_per_s: rows / (hydrationMs / 1000),
    hydration_longest_task_ms: longestTask,
    hydration_in_page_rows_per_s: rows / (inPage.ms / 1000),
    hydration_in_page_longest_task_ms: inPage.longestTask,
    fetch_parse_rows_per_s: rows / (fetchMs / 1000),
    follower_heap_mib: (holding - idle) / 2 ** 20,
    idle_client_heap_mib: (idle - bare) / 2 ** 20,
    rate: 1000,
    commits: 1000 * seconds,
    samples: samples.length,
    p50_ms: at(samples, 0.5),
    p99_ms: at(samples, 0.99),
    max_ms: samples.at(-1),
    socket_p50_ms: at(socket, 0.5),
    socket_p99_ms: at(socket, 0.99),
  };
  log(JSON.stringify(result));
  if (process.env.BENCH_OUT) appendFileSync(`${process.env.BENCH_OUT}/results.jsonl`, JSON.stringify(result) + "\n");
}

// ---- issue 19: each numbered problem, as a new user meets it --------------------------

/** The title a tab shows for a task (undefined: no such row). */
const titleIn = (page, id) => page.evaluate((id) => window.tasks.get(String(id))?.title, id);

/** True when the tab shows task `id` with `title`, else what it shows. */
const shows = async (page, id, title) => {
  const now = await titleIn(page, id);
  return now === title || (now ?? "missing");
};

/** 1. A delete and a re-insert of one key in one message (a replace in one transaction, a
 * catch-up after being away) leave the row in the local copy, in memory and in IndexedDB. */
export async function delete_and_reinsert(browser) {
  const context = await browser.newContext();
  let page = await openClient(context, "alice");
  await until("task 1", async () => (await titleIn(page, 1)) === "Write the announcement" || "not yet");
  await sql("BEGIN; DELETE FROM app.task WHERE id = 1; INSERT INTO app.task (id, project_id, title) VALUES (1, 'p1', 'replaced'); COMMIT");
  await until("the replaced task 1", () => shows(page, 1, "replaced"), 10000);
  // Away: the tab is closed while task 2 is deleted and inserted again; it catches up in one replay.
  await until("task 1 stored", async () => (await storedTasks(page)) === (await tableTasks()) || "not yet", 10000);
  await page.close();
  await sql("DELETE FROM app.task WHERE id = 2");
  await sql("INSERT INTO app.task (id, project_id, title) VALUES (2, 'p2', 'back again')");
  page = await openClient(context, "alice");
  await until("the re-inserted task 2", () => shows(page, 2, "back again"), 10000);
  await until("IndexedDB to equal the table", async () => (await storedTasks(page)) === (await tableTasks()) || "not yet", 10000);
  assert.equal(await tabTasks(page), await tableTasks());
}

/** 2a. A tab that opens after the leader went live says `live` too. */
export async function status_late_tab(browser) {
  const context = await browser.newContext();
  const first = await openClient(context, "alice");
  await until("the first tab live", async () => (await first.evaluate(() => window.client.status)) === "live" || "not live");
  const late = await openClient(context, "alice");
  await until("the late tab live", async () => (await late.evaluate(() => window.client.status)) === "live" || late.evaluate(() => window.client.status), 10000);
  assert.equal(await metric("sync_connections"), 1, "one socket for the two tabs");
}

/** 2b. After the browser's offline toggle and back, every tab is live again while changes arrive. */
export async function status_offline_toggle(browser) {
  const context = await browser.newContext();
  const pages = [await openClient(context, "alice"), await openClient(context, "alice")];
  const statuses = () => Promise.all(pages.map((p) => p.evaluate(() => window.client.status)));
  await until("both tabs live", async () => (await statuses()).every((s) => s === "live") || statuses());
  await context.setOffline(true);
  await until("both tabs offline or still live on a working socket", async () => (await statuses()).every((s) => s !== "connecting") || statuses(), 10000);
  await context.setOffline(false);
  await sql("UPDATE app.task SET title = 'after the toggle' WHERE id = 1");
  await until("the change in both tabs", async () => (await Promise.all(pages.map((p) => titleIn(p, 1)))).every((t) => t === "after the toggle") || "not yet");
  await until("both tabs live", async () => (await statuses()).every((s) => s === "live") || statuses(), 10000);
}

/** 2c. While the gateway is down every tab says `offline`; when it is back, `live`. */
export async function status_gateway_down(browser) {
  const context = await browser.newContext();
  const pages = [await openClient(context, "alice"), await openClient(context, "alice")];
  const statuses = () => Promise.all(pages.map((p) => p.evaluate(() => window.client.status)));
  await until("both tabs live", async () => (await statuses()).every((s) => s === "live") || statuses());
  await stopGateway();
  await until("both tabs offline", async () => (await statuses()).every((s) => s === "offline") || statuses(), 15000);
  await startGateway();
  await sql("UPDATE app.task SET title = 'gateway back' WHERE id = 1");
  await until("both tabs live with the change", async () =>
    ((await statuses()).every((s) => s === "live") && (await Promise.all(pages.map((p) => titleIn(p, 1)))).every((t) => t === "gateway back")) || statuses(),
  );
}

/** 3. Sign-out with another tab of the user open: it resolves, the database is gone, and the
 * other tab stops acting for the user (no socket, no database made again). */
export async function sign_out_everywhere(browser) {
  const context = await browser.newContext();
  const [a, b] = [await openClient(context, "alice"), await openClient(context, "alice")];
  await until("both tabs have the tasks", async () => (await Promise.all([a, b].map((p) => titleIn(p, 1)))).every(Boolean) || "not yet");
  const outcome = await a.evaluate(() =>
    Promise.race([window.client.clearLocalData().then(() => "resolved"), new Promise((r) => setTimeout(() => r("still waiting after 10 s"), 10000))]),
  );
  assert.equal(outcome, "resolved", "clearLocalData() resolves");
  assert.deepEqual(await databases(a), [], "the user's database is deleted");
  await until("no socket for the user", async () => (await metric("sync_connections")) === 0 || "a socket is open");
  await sql("UPDATE app.task SET title = 'after sign-out' WHERE id = 1");
  await b.evaluate(() => new Promise((r) => setTimeout(r, 500))); // a change had time to reach a tab that was still syncing
  assert.deepEqual(await databases(b), [], "the other tab made no database again");
  assert.equal(await metric("sync_connections"), 0);
}

/** 4. A write made before the tab closed that ends in 409 is told to the next tab that
 * registers a handler. */
export async function conflict_after_reload(browser) {
  const context = await browser.newContext();
  const first = await openDemo(context, "alice");
  await context.setOffline(true);
  await first.evaluate(() => window.demo.tasks.update("1", { title: "mine" }, { expect: { title: "not what it is" } }));
  await first.close();
  await context.setOffline(false);
  const next = await openDemo(context, "alice");
  await until("the conflict told to the new tab", async () => (await next.evaluate(() => window.demo.refusals.length)) > 0 || "none", 15000);
  const refusal = await next.evaluate(() => window.demo.refusals[0]);
  assert.equal(refusal.status, 409);
  assert.equal(refusal.mutation.entityId, "1");
  assert.equal(refusal.current.title, "Write the announcement");
  // The refusal may come before the tab's first sync has brought the row.
  await until("rolled back to the server's row", async () => (await next.evaluate(() => window.demo.tasks.get("1")?.title)) === "Write the announcement" || "not yet");
}

/** 5. What a developer should not have to guess: the first sync, ids in their own type,
 * sorted and limited live queries, the script builds. */
export async function first_sync_and_queries(browser) {
  const context = await browser.newContext();
  const page = await openClient(context, "alice");
  const first = await page.evaluate(async () => {
    await window.client.waitForFirstSync();
    return window.tasks.all().length;
  });
  assert.equal(first, 3, "after waitForFirstSync() every row is there");
  assert.equal(await page.evaluate(() => window.tasks.get(2)?.title), "Check the numbers", "get(2) with a number");
  await page.evaluate(() => {
    window.top2 = [];
    window.tasks.subscribe(undefined, (rows) => (window.top2 = rows.map((r) => r.title)), { orderBy: { column: "title", desc: true }, limit: 2 });
  });
  assert.deepEqual(await page.evaluate(() => window.top2), ["Write the announcement", "Plant tomatoes"]);
  await sql("INSERT INTO app.task (id, project_id, title) VALUES (40, 'p1', 'Zebra crossing')");
  await until("the live query's new first row", async () => (await page.evaluate(() => window.top2.join(","))) === "Zebra crossing,Write the announcement" || page.evaluate(() => window.top2));
  assert.deepEqual(await page.evaluate(() => window.tasks.where([{ column: "project_id", op: "eq", value: "p1" }], { orderBy: "id", limit: 2 }).map((r) => r.id)), [1, 2]);
  // The ES module with idb inside, without a bundler.
  const module = await context.newPage();
  await module.goto(`${GATEWAY}/blank.html`);
  const count = await module.evaluate(async ([t]) => {
    const { createClient } = await import("/pg-sync.js");
    const client = createClient({ url: location.origin, token: t });
    const tasks = client.entity("task");
    await client.waitForFirstSync();
    return tasks.all().length;
  }, [await token("bob")]);
  assert.equal(count, 4, "the ES module build syncs");
}

/** 5. An applied write settles when its cursor is reached, with nothing else changing: the
 * server's version (its defaults) replaces the optimistic one and the stored outbox empties. */
export async function writes_settle(browser) {
  const context = await browser.newContext();
  const page = await openClient(context, "alice");
  await until("live", async () => (await page.evaluate(() => window.client.status)) === "live" || "not live");
  await page.evaluate(() => window.tasks.insert({ id: 50, project_id: "p1", title: "defaults from the server" }));
  await until("the server's row (its updated_at)", async () => !!(await page.evaluate(() => window.tasks.get("50")?.updated_at)) || page.evaluate(() => window.tasks.get("50")), 10000);
  await until("the outbox settled", async () => (await page.evaluate(() => window.client.replica.pendingMutations().length)) === 0 || "pending", 10000);
  // A write that changes nothing the log records (the title it already has): no message
  // passes its cursor, yet it settles.
  await page.evaluate(() => window.tasks.update("2", { title: "Check the numbers" }));
  assert.deepEqual(await page.evaluate(() => window.refusals.length), 0, "nothing refused");
  await until("the write that changed nothing settled", async () => (await page.evaluate(() => window.client.replica.pendingMutations().length)) === 0 || "pending", 10000);
  const outbox = await page.evaluate(async () => {
    const name = (await indexedDB.databases()).map((d) => d.name).find((n) => n.startsWith("pg-sync:"));
    const db = await new Promise((resolve) => (indexedDB.open(name).onsuccess = (e) => resolve(e.target.result)));
    const n = await new Promise((resolve) => (db.transaction("outbox").objectStore("outbox").count().onsuccess = (e) => resolve(e.target.result)));
    db.close();
    return n;
  });
  assert.equal(outbox, 0, "the stored outbox is empty");
}

/** 6. A transaction's changes across entities reach the app at once: 1,000 transactions
 * each move a task between two projects and update both projects' counts; the counts a
 * live query sees always match the tasks it sees. */
export async function transactions_whole(browser) {
  const context = await browser.newContext();
  const page = await openClient(context, "alice");
  await page.evaluate(async () => {
    window.projects = window.client.entity("project");
    window.torn = [];
    window.checks = 0;
    const check = () => {
      window.checks++;
      for (const p of window.projects.all()) {
        const tasks = window.tasks.all().filter((t) => t.project_id === p.id).length;
        if (tasks !== p.task_count) window.torn.push(`${p.id}: ${tasks} tasks, task_count ${p.task_count}`);
      }
    };
    window.tasks.subscribe(undefined, check);
    window.projects.subscribe(undefined, check);
  });
  await until("live", async () => (await page.evaluate(() => window.client.status)) === "live" || "not live");
  const move = `WITH t AS (UPDATE app.task SET project_id = CASE project_id WHEN 'p1' THEN 'p2' ELSE 'p1' END
                            WHERE id = $1 % 3 + 1 RETURNING project_id AS dst),
                    a AS (UPDATE app.project SET task_count = task_count + 1 WHERE id = (SELECT dst FROM t))
               UPDATE app.project SET task_count = task_count - 1 WHERE id IN ('p1', 'p2') AND id <> (SELECT dst FROM t)`;
  await load(move, 200, 5);
  const counts = async () => JSON.stringify((await query("SELECT id, task_count FROM app.project ORDER BY id")).map((p) => [p.id, p.task_count]));
  await until("the last counts", async () =>
    (await page.evaluate(() => JSON.stringify(window.projects.all().map((p) => [p.id, p.task_count]).sort()))) === (await counts()) || "not yet",
  );
  await converged([page]);
  const { torn, checks } = await page.evaluate(() => ({ torn: window.torn, checks: window.checks }));
  log(`${checks} live-query callbacks, ${torn.length} saw half a transaction`);
  assert.deepEqual(torn.slice(0, 5), [], "no live query saw half a transaction");
}

/** Issue 18, 8: ERROR forbidden (the user may no longer read the entity) drops its rows. */
export async function forbidden_drops_rows(browser) {
  const context = await browser.newContext();
  const page = await openClient(context, "alice");
  await until("tasks stored", async () => (await storedTasks(page)) === (await tableTasks()) || "not yet");
  await sql("REVOKE SELECT ON app.task FROM app_user");
  await sql("UPDATE app.task SET title = 'unseen' WHERE id = 1");
  await until("no task rows in IndexedDB", async () => (await storedTasks(page)) === "" || storedTasks(page), 15000);
  assert.equal(await page.evaluate(() => window.tasks.all().length), 0, "and none in memory");
}

/** Issue 18, 8: a token with another role drops the rows fetched under the old one. */
export async function role_change_drops_rows(browser) {
  const context = await browser.newContext();
  // The token expires within a minute, so the client asks for the next one at once.
  const soon = Math.floor(Date.now() / 1000) + 50;
  const page = await openClient(context, "alice", { claims: { exp: soon }, getToken: true });
  await until("tasks stored", async () => (await storedTasks(page)) === (await tableTasks()) || "not yet");
  const limited = await token("alice", "app_limited");
  // The next write asks for a token, and gets one with the other role.
  await page.evaluate((t) => {
    window.token = t;
    void window.tasks.update("3", { title: "written under the new role" });
  }, limited);
  await until("no task rows in IndexedDB", async () => (await storedTasks(page)) === "" || storedTasks(page), 20000);
  // The write under the new role is refused (403) and rolled back: then nothing shows.
  await until("no task rows in memory", async () => (await page.evaluate(() => window.tasks.all().length)) === 0 || "some", 10000);
}
