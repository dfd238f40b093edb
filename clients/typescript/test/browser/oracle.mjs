// The TypeScript client as a client of the whole-pipeline oracle (tests/tests/oracle.rs): one
// browser context per user (its own IndexedDB and socket), each following the oracle's
// entities with the client's script-tag build. The oracle drives it with one JSON command per
// line on stdin and reads one answer per line on stdout:
//   {"open": {"gateway", "users": [{"name", "token"}], "entities": [...]}}
//        -> {"ok": null} once every tab's first sync is done
//   {"reconnect": {"user", "gateway"}}
//        -> {"ok": null} once that tab's client is closed and made again on `gateway`: on the
//           same gateway it resumes from the cursors in its IndexedDB, on another it starts a
//           copy of its own (the database is per user and gateway)
//   {"check": {"truth": {user: {entity: rows | "forbidden" | "unknown"}}, "timeoutMs"}}
//        -> {"ok": null} once every user's copy equals what PostgreSQL lets them SELECT, live
//           and steadily (the work is paused meanwhile, so a copy still different at the
//           timeout stays wrong), else {"error": the first difference}; an entity not
//           tracked must not be shown live (its rows may stay)
// Everything else it prints goes to stderr.
import { createInterface } from "node:readline";
import { launch } from "./chromium.mjs";

const browser = await launch();
const tabs = new Map();

async function open({ gateway, users, entities }) {
  for (const { name, token } of users) {
    const context = await browser.newContext();
    const page = await context.newPage();
    page.on("pageerror", (e) => console.error(`  [oracle browser] ${name} tab error: ${e.message}`));
    await page.goto(`${gateway}/blank.html`);
    await page.addScriptTag({ url: `${gateway}/client.js` });
    await page.evaluate(
      ([token, entities]) => {
        window.follow = (url) => {
          // Retries and rechecks of a forbidden entity soon: the oracle waits for them.
          window.client = window.PgSync.createClient({
            url,
            token,
            retry: { baseMs: 50, capMs: 500 },
            recheckForbiddenMs: 200,
            onError: () => undefined,
          });
          window.followed = Object.fromEntries(entities.map((code) => [code, window.client.entity(code)]));
        };
        window.follow(location.origin);
        // Each tab starts synced, so that a cold browser's first start is not taken for a
        // client that does not converge.
        return window.client.waitForFirstSync();
      },
      [token, entities],
    );
    tabs.set(name, page);
  }
}

async function reconnect({ user, gateway }) {
  // Not waiting for the new client's first sync: an entity no longer tracked never has one
  // (the next check waits for what must hold). A client closed while it starts, starts
  // nothing more (leader.ts).
  await tabs.get(user).evaluate((url) => {
    window.client.close();
    window.follow(url);
  }, gateway);
}

/** A row as text with its keys in order, so that equal rows compare equal. */
function canonical(value) {
  if (Array.isArray(value)) return `[${value.map(canonical).join(",")}]`;
  if (value && typeof value === "object") {
    return `{${Object.keys(value)
      .sort()
      .map((k) => `${JSON.stringify(k)}:${canonical(value[k])}`)
      .join(",")}}`;
  }
  return JSON.stringify(value);
}

const sorted = (rows) => rows.map(canonical).sort();

/** The first difference between what `name`'s tab holds and `truth`, or null. */
async function difference(name, truth) {
  const held = await tabs.get(name).evaluate(() =>
    Object.fromEntries(
      Object.entries(window.followed).map(([code, entity]) => [
        code,
        {
          rows: entity.all(),
          error: window.client.syncStatus.entities[code]?.error ?? null,
          live: window.client.syncStatus.entities[code]?.live ?? false,
        },
      ]),
    ),
  );
  for (const [code, expected] of Object.entries(truth)) {
    const { rows, error, live } = held[code];
    if (expected === "unknown") {
      // Not tracked: the client must not show it live (what it held may stay).
      if (live) return `${name} shows ${code} live, though it is not tracked`;
      continue;
    }
    if (expected === "forbidden") {
      if (error !== "forbidden" || rows.length > 0) {
        return `${name} holds ${rows.length} rows of ${code} (error ${error}) where PostgreSQL refuses it`;
      }
      continue;
    }
    if (error !== null || !live) return `${name} is not live on ${code} (error ${error})`;
    const [have, want] = [sorted(rows), sorted(expected)];
    if (have.join("\n") !== want.join("\n")) {
      const extra = have.filter((r) => !want.includes(r));
      const missing = want.filter((r) => !have.includes(r));
      return `${name} holds of ${code} (error ${error}) rows PostgreSQL does not let it SELECT: ${extra.join(" ")}; and lacks: ${missing.join(" ")}`;
    }
  }
  return null;
}

/** Equal this many polls in a row (50 ms apart): a copy that only passes through the right
 * state on its way elsewhere (a stale change applied after) is not taken for converged. */
const STEADY = 5;

async function check({ truth, timeoutMs }) {
  const deadline = Date.now() + timeoutMs;
  let steady = 0;
  for (;;) {
    let first = null;
    for (const name of Object.keys(truth)) {
      first ??= await difference(name, truth[name]);
    }
    steady = first === null ? steady + 1 : 0;
    if (steady === STEADY) return;
    if (first !== null && Date.now() > deadline) throw new Error(`after ${timeoutMs} ms of no work: ${first}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

for await (const line of createInterface({ input: process.stdin })) {
  const command = JSON.parse(line);
  try {
    if (command.open) await open(command.open);
    else if (command.reconnect) await reconnect(command.reconnect);
    else if (command.check) await check(command.check);
    else throw new Error(`unknown command ${line}`);
    process.stdout.write(JSON.stringify({ ok: null }) + "\n");
  } catch (e) {
    process.stdout.write(JSON.stringify({ error: String(e.message ?? e) }) + "\n");
  }
}
await browser.close();
process.exit();
