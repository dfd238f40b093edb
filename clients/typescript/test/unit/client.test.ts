/**
 * The client against a gateway in memory: what a developer relies on, one behaviour a test.
 */
import { openDB } from "idb";
import { afterEach, describe, expect, it, vi } from "vitest";
import { createClient, type ClientOptions, type Refusal, type SyncClient } from "../../src/client.js";
import type { Row } from "../../src/store.js";
import { FakeGateway } from "./fake-gateway.js";

let users = 0;
const jwt = (claims: object) => `x.${btoa(JSON.stringify(claims))}.y`;

/** A gateway with tasks 1 and 2, and a client for a new user on it. */
function setup(options: Partial<ClientOptions> = {}, claims: object = {}) {
  const gateway = new FakeGateway(7);
  gateway.commit([
    { entity: "task", id: "1", action: "CREATE", data: { id: 1, title: "one" } },
    { entity: "task", id: "2", action: "CREATE", data: { id: 2, title: "two" } },
  ]);
  vi.stubGlobal("fetch", gateway.fetch);
  vi.stubGlobal("WebSocket", gateway.WebSocket);
  const sub = `user${users++}`;
  const token = jwt({ sub, ...claims });
  const open = (more: Partial<ClientOptions> = {}) =>
    createClient({ url: "http://gateway", token, retry: { baseMs: 1, capMs: 4 }, ...options, ...more });
  return { gateway, sub, token, open, db: `pg-sync:${sub}@http://gateway` };
}

/** What the user's database holds, read directly. */
async function stored(name: string): Promise<{ rows: Row[]; meta: string[]; outbox: number; refusals: number }> {
  const db = await openDB(name);
  const result = {
    rows: (await db.getAll("rows")) as Row[],
    meta: (await db.getAllKeys("meta")) as string[],
    outbox: await db.count("outbox"),
    refusals: db.objectStoreNames.contains("refusals") ? await db.count("refusals") : 0,
  };
  db.close();
  return result;
}

const settled = (client: SyncClient) => (client as unknown as { writing: Promise<void> }).writing;
/** Every socket message delivered so far has been handled. */
const handled = (client: SyncClient) => (client as unknown as { queue: Promise<void> }).queue;
const wait = (check: () => unknown, timeout = 3000) => vi.waitFor(check, { timeout, interval: 2 });

afterEach(() => vi.unstubAllGlobals());

describe("first sync", () => {
  it("is a promise: after it, the rows are there", async () => {
    const { open } = setup();
    const client = open();
    const tasks = client.entity("task");
    expect(tasks.all()).toEqual([]);
    await client.waitForFirstSync();
    expect(tasks.all().map((t) => t.title)).toEqual(["one", "two"]);
    expect(client.syncStatus.hasSynced).toBe(true);
    client.close();
  });

  it("closed while it starts, starts nothing more", async () => {
    const { open } = setup();
    const client = open();
    client.close();
    await (client as unknown as { ready: Promise<void> }).ready;
    // A channel opened after the close would talk to the other tabs for a closed client.
    expect((client as unknown as { channel?: BroadcastChannel }).channel).toBeUndefined();
  });

  it("takes ids in the key's own type", async () => {
    const { open } = setup();
    const client = open();
    const tasks = client.entity("task");
    await client.waitForFirstSync();
    expect(tasks.get(1)?.title).toBe("one");
    expect(tasks.get("1")?.title).toBe("one");
    const pairs = client.entity("pair", { key: ["a", "b"] });
    expect(pairs.key([7, "u1"])).toBe('["7","u1"]');
    client.close();
  });

  it("answers queries in order, limited, live", async () => {
    const { gateway, open } = setup();
    const client = open();
    const tasks = client.entity("task");
    const seen: string[][] = [];
    tasks.subscribe(undefined, (rows) => seen.push(rows.map((r) => String(r.title))), { orderBy: { column: "title", desc: true }, limit: 1 });
    await client.waitForFirstSync();
    await wait(() => expect(seen.at(-1)).toEqual(["two"]));
    gateway.commit([{ entity: "task", id: "3", action: "CREATE", data: { id: 3, title: "zzz" } }]);
    await wait(() => expect(seen.at(-1)).toEqual(["zzz"]));
    expect(tasks.where([{ column: "id", op: "lt", value: 3 }], { orderBy: "title" }).map((r) => r.id)).toEqual([1, 2]);
    client.close();
  });
});

describe("writes", () => {
  it("settle once the stream has reached them (REACHED), showing the server's row, with the outbox empty", async () => {
    const { gateway, open, db } = setup();
    gateway.trigger = (_entity, row) => ({ ...row, stamped: "by the server" });
    const client = open();
    const tasks = client.entity("task");
    await client.waitForFirstSync();
    await tasks.update(1, { title: "mine" });
    await wait(() => expect(tasks.get(1)).toEqual({ id: 1, title: "mine", stamped: "by the server" }));
    await wait(() => expect(client.replica.pendingMutations()).toEqual([]));
    await settled(client);
    expect((await stored(db)).outbox).toBe(0);
    expect(gateway.sockets[0]!.received.some((m) => m.type === "AWAIT")).toBe(true);
    client.close();
  });

  it("settle only once the transaction that brought them back is whole (a REACHED before its end)", async () => {
    const { gateway, open } = setup();
    const client = open();
    const tasks = client.entity("task");
    client.entity("project");
    await client.waitForFirstSync();
    const seen: unknown[] = [];
    tasks.subscribe(undefined, (rows) => seen.push(rows.find((r) => r.id === 1)?.title));
    // The write's transaction updates a project too (a trigger), and its end comes late.
    gateway.writeSideEffects = [{ entity: "project", id: "1", action: "CREATE", data: { id: 1, tasks: 1 } }];
    gateway.holdTxEnds = true;
    await tasks.update(1, { title: "mine" });
    const socket = gateway.sockets[0]!;
    await wait(() => expect(socket.received.some((m) => m.type === "AWAIT")).toBe(true));
    await wait(() => expect(socket.idle).toBe(true));
    await handled(client); // the REACHED, delivered before the transaction's end
    expect(tasks.get(1)?.title).toBe("mine");
    gateway.releaseTxEnds();
    await wait(() => expect(client.replica.pendingMutations()).toEqual([]));
    expect(tasks.get(1)?.title).toBe("mine");
    expect(seen.slice(seen.indexOf("mine"))).not.toContain("one");
    client.close();
  });

  it("subscribe again when the gateway ends a subscription with an error after SUBSCRIBED (a failed replay)", async () => {
    const { gateway, open } = setup();
    const client = open();
    const tasks = client.entity("task");
    await client.waitForFirstSync();
    const socket = gateway.sockets[0]!;
    const subscribes = () => socket.received.filter((m) => m.type === "SUBSCRIBE").length;
    const before = subscribes();
    socket.subs.delete("task"); // the gateway ended it
    socket.push({ type: "ERROR", payload: { code: "internal", entityCode: "task", message: "the replay failed: subscribe again from your cursor" } });
    await wait(() => expect(subscribes()).toBe(before + 1));
    gateway.commit([{ entity: "task", id: "3", action: "CREATE", data: { id: 3, title: "three" } }]);
    await wait(() => expect(tasks.get(3)?.title).toBe("three"));
    client.close();
  });

  it("apply what a catch-up held and settle writes when it ends without SYNCED (the entity was refused)", async () => {
    const { gateway, open } = setup();
    const client = open();
    const tasks = client.entity("task");
    await client.waitForFirstSync();
    const socket = gateway.sockets[0]!;
    gateway.endlessReplays.add("project");
    client.entity("project"); // its replay runs on: the socket is catching up
    await wait(() => expect(socket.received.some((m) => m.type === "SUBSCRIBE" && m.payload?.entityCode === "project")).toBe(true));
    await tasks.update(1, { title: "mine" });
    gateway.commit([{ entity: "task", id: "2", action: "UPDATE", data: { id: 2, title: "later" } }]);
    await wait(() => expect(socket.idle).toBe(true));
    await handled(client);
    expect(tasks.get(2)?.title).toBe("two"); // held for the end of the catch-up
    // The replay ends without SYNCED: the role may not read the entity.
    socket.push({ type: "ERROR", payload: { code: "forbidden", entityCode: "project", message: "no SELECT on project" } });
    await wait(() => expect(tasks.get(2)?.title).toBe("later"));
    await wait(() => expect(client.replica.pendingMutations()).toEqual([]));
    expect(tasks.get(1)?.title).toBe("mine");
    client.close();
  });

  /** A client of `setup` following project (forbidden to the user) and task, once synced. */
  async function forbiddenProject(recheckForbiddenMs: number) {
    const { gateway, open } = setup({ recheckForbiddenMs });
    gateway.commit([{ entity: "project", id: "1", action: "CREATE", data: { id: 1, name: "p" } }]);
    gateway.forbidden.add("project");
    const client = open();
    const projects = client.entity("project");
    client.entity("task");
    await client.waitForFirstSync();
    expect(client.syncStatus.entities.project?.error).toBe("forbidden");
    return { gateway, client, projects };
  }

  it("ask again, after a while, for an entity the user could not read: a GRANT is not announced", async () => {
    const { gateway, client, projects } = await forbiddenProject(50);
    const asked = gateway.snapshotTimes.length;
    await wait(() => expect(gateway.snapshotTimes.length).toBeGreaterThan(asked + 1)); // asked again, still refused
    gateway.forbidden.delete("project"); // GRANT SELECT ON project
    await wait(() => expect(projects.get(1)?.name).toBe("p"));
    expect(client.syncStatus.entities.project?.error).toBeUndefined();
    client.close();
  });

  it("keep the status while a forbidden entity is asked again (it stays forbidden until answered)", async () => {
    const { gateway, client } = await forbiddenProject(30);
    await wait(() => expect(client.status).toBe("live"));
    const statuses: string[] = [];
    client.onStatus((s) => statuses.push(s));
    const asked = gateway.snapshotTimes.length;
    await wait(() => expect(gateway.snapshotTimes.length).toBeGreaterThan(asked + 2));
    expect(statuses.filter((s) => s !== "live")).toEqual([]);
    expect(client.syncStatus.entities.project?.error).toBe("forbidden");
    client.close();
  });

  it("ask again for a forbidden entity at a new socket, and not before a recheck is due (even one too long for a timer)", async () => {
    const { gateway, client, projects } = await forbiddenProject(30 * 24 * 3_600_000);
    const asked = gateway.snapshotTimes.length;
    await new Promise((resolve) => setTimeout(resolve, 100)); // the duration under test: no recheck in it
    expect(gateway.snapshotTimes.length).toBe(asked);
    gateway.forbidden.delete("project");
    gateway.sockets[0]!.close(1012);
    await wait(() => expect(projects.get(1)?.name).toBe("p"));
    client.close();
  });

  it("settle a write of an entity whose replay failed only once its change is shown (REACHED covers live entities)", async () => {
    const { gateway, open } = setup();
    gateway.commit([{ entity: "project", id: "1", action: "CREATE", data: { id: 1, name: "p" } }]);
    const client = open();
    client.entity("task");
    const projects = client.entity("project");
    await client.waitForFirstSync();
    // A new socket, on which project's replay runs on.
    gateway.endlessReplays.add("project");
    gateway.sockets[0]!.close(1012);
    await wait(() => expect(gateway.sockets[0]?.received.filter((m) => m.type === "SUBSCRIBE").length).toBe(2));
    const socket = gateway.sockets[0]!;
    await projects.update(1, { name: "mine" });
    await wait(() => expect(client.pendingWrites).toBe(0)); // applied by the server
    const seen: unknown[] = [];
    projects.subscribe(undefined, (rows) => seen.push(rows[0]?.name));
    // The replay fails; the retry (from the cursor) brings the write's change back.
    gateway.endlessReplays.delete("project");
    socket.subs.delete("project");
    socket.push({ type: "ERROR", payload: { code: "internal", entityCode: "project", message: "the replay failed" } });
    await wait(() => expect(client.replica.pendingMutations()).toEqual([]));
    expect(projects.get(1)?.name).toBe("mine");
    expect(seen).not.toContain("p");
    expect(socket.received.some((m) => m.type === "AWAIT")).toBe(true);
    client.close();
  });

  it("wait for an entity again at a new socket after one of its SUBSCRIBEs was refused (a transaction stays whole)", async () => {
    const { gateway, open } = setup();
    gateway.commit([{ entity: "project", id: "1", action: "CREATE", data: { id: 1, name: "p" } }]);
    const client = open();
    const tasks = client.entity("task");
    const projects = client.entity("project");
    await client.waitForFirstSync();
    gateway.sockets[0]!.push({ type: "ERROR", payload: { code: "internal", entityCode: "project", message: "busy" } });
    await wait(() => expect(gateway.sockets[0]!.received.filter((m) => m.type === "SUBSCRIBE").length).toBe(3));
    await wait(() => expect(client.status).toBe("live"));
    gateway.endlessReplays.add("project");
    gateway.sockets[0]!.close(1012);
    await wait(() => expect(gateway.sockets[0]?.received.filter((m) => m.type === "SUBSCRIBE").length).toBe(2));
    const socket = gateway.sockets[0]!;
    // One transaction: project's part is in its replay, task's comes live.
    gateway.commit([
      { entity: "project", id: "1", action: "UPDATE", data: { id: 1, name: "renamed" } },
      { entity: "task", id: "1", action: "UPDATE", data: { id: 1, title: "of renamed" } },
    ]);
    await wait(() => expect(socket.idle).toBe(true));
    await handled(client);
    expect({ task: tasks.get(1)?.title, project: projects.get(1)?.name }).toEqual({ task: "one", project: "p" });
    client.close();
  });

  it("settle with an older gateway too, once the stream passes them", async () => {
    const { gateway, open } = setup();
    gateway.awaits = false;
    const client = open();
    const tasks = client.entity("task");
    await client.waitForFirstSync();
    await tasks.update(1, { title: "mine" });
    await wait(() => expect(client.pendingWrites).toBe(0));
    gateway.commit([{ entity: "task", id: "2", action: "UPDATE", data: { id: 2, title: "later" } }]);
    await wait(() => expect(client.replica.pendingMutations()).toEqual([]));
    client.close();
  });

  it("refused while no tab could be told, are kept and told to the next tab with a handler", async () => {
    const { gateway, open, db } = setup();
    const first = open();
    await first.waitForFirstSync();
    gateway.pause(); // the answer comes after the tab closed
    gateway.writeFaults.push(409);
    const fetchOnce = gateway.fetch;
    let answered!: () => void;
    const answer = new Promise<void>((resolve) => (answered = resolve));
    vi.stubGlobal("fetch", async (input: string, init?: RequestInit) => {
      const response = await fetchOnce(input, init);
      if (input.endsWith("/v1/write")) answered();
      return response;
    });
    await first.entity("task").update(1, { title: "mine" }, { expect: { title: "not so" } });
    await answer;
    await wait(async () => expect((await stored(db)).refusals).toBe(1));
    first.close();
    gateway.resume();
    const told: Refusal[] = [];
    const second = open();
    second.onConflict((conflict) => told.push(conflict));
    await wait(() => expect(told.map((r) => r.status)).toEqual([409]));
    expect(told[0]!.mutation.entityId).toBe("1");
    await wait(async () => expect((await stored(db)).refusals).toBe(0));
    const third = (second.close(), open({ onConflict: (c) => told.push(c) }));
    await third.ready;
    await third.waitForFirstSync();
    expect(told.length).toBe(1); // told once
    third.close();
  });
});

describe("status", () => {
  it("is offline while the gateway cannot be reached, and live again after", async () => {
    const { gateway, open } = setup();
    const client = open();
    client.entity("task");
    await wait(() => expect(client.status).toBe("live"));
    gateway.down = true;
    gateway.sockets[0]!.close(1006);
    await wait(() => expect(client.status).toBe("offline"));
    expect(client.syncStatus.connected).toBe(false);
    gateway.down = false;
    await wait(() => expect(client.status).toBe("live"));
    expect(client.syncStatus).toMatchObject({ connected: true, hasSynced: true, entities: { task: { hasSynced: true, live: true } } });
    client.close();
    expect(client.syncStatus.closed).toBe(true);
  });
});

describe("back-pressure", () => {
  it("RECONNECT: the client comes back no sooner than asked, without growing its back-off", async () => {
    const { gateway, open } = setup();
    const client = open();
    client.entity("task");
    await wait(() => expect(client.status).toBe("live"));
    const asked = Date.now();
    gateway.sockets[0]!.push({ type: "RECONNECT", payload: { afterMs: 150, reason: "shutdown" } });
    await wait(() => expect(gateway.connectTimes.length).toBe(2));
    expect(gateway.connectTimes[1]! - asked).toBeGreaterThanOrEqual(150);
    await wait(() => expect(client.status).toBe("live"));
    client.close();
  });

  it("a snapshot answered 503 is fetched again no sooner than its Retry-After", async () => {
    const { gateway, open } = setup();
    gateway.snapshotFaults.push({ status: 503, retryAfter: "1" });
    const client = open();
    client.entity("task");
    await client.waitForFirstSync();
    const [first, second] = gateway.snapshotTimes;
    expect(second! - first!).toBeGreaterThanOrEqual(1000);
    expect(client.syncStatus.lastError?.message).toMatch(/503/);
    client.close();
  });
});

describe("access", () => {
  it("ERROR forbidden drops the entity's rows and position", async () => {
    const { gateway, open, db } = setup();
    const client = open();
    const tasks = client.entity("task");
    await client.waitForFirstSync();
    await wait(() => expect(client.status).toBe("live"));
    gateway.sockets[0]!.push({ type: "ERROR", payload: { code: "forbidden", message: "no", entityCode: "task" } });
    await wait(() => expect(tasks.all()).toEqual([]));
    await settled(client);
    expect(await stored(db)).toMatchObject({ rows: [], meta: [] });
    expect(client.syncStatus.entities.task?.error).toBe("forbidden");
    client.close();
  });

  it("a token with another role or claims drops the rows fetched under the old ones", async () => {
    const { gateway, sub, open } = setup({}, { role: "reader" });
    let token = jwt({ sub, role: "reader", exp: Math.floor(Date.now() / 1000) + 30 });
    const client = open({ getToken: () => token });
    const tasks = client.entity("task");
    await client.waitForFirstSync();
    const before = gateway.snapshotTimes.length;
    token = jwt({ sub, role: "auditor", exp: Math.floor(Date.now() / 1000) + 3600 });
    // The next token refresh (the old one expires within a minute) brings the new role.
    gateway.sockets[0]!.close(1006);
    await wait(() => expect(gateway.snapshotTimes.length).toBe(before + 1));
    await wait(() => expect(tasks.all().length).toBe(2));
    client.close();
  });
});

describe("refetch", () => {
  it("a RESYNC met while subscribing: the earlier subscription's catch-up is not applied over the new snapshot", async () => {
    const { gateway, open } = setup();
    const client = open();
    const tasks = client.entity("task");
    await client.waitForFirstSync();
    await wait(() => expect(client.status).toBe("live"));
    const title = (title: string) => () => gateway.commit([{ entity: "task", id: "1", action: "UPDATE", data: { id: 1, title } }]);
    // While the first refetch streams, a change its subscription's catch-up carries; before
    // the second, one that only the second snapshot has.
    gateway.snapshotHooks.push({ after: title("old") }, { before: title("new") });
    // Two RESYNCs: the second sent before the gateway had the client's UNSUBSCRIBE.
    const resync = { type: "RESYNC", payload: { entityCode: "task", reason: "access_changed" } };
    gateway.sockets[0]!.push(resync);
    gateway.sockets[0]!.push(resync);
    await wait(() => expect(gateway.snapshotTimes.length).toBe(3));
    await wait(() => expect(gateway.sockets[0]!.idle && client.status === "live").toBe(true));
    await settled(client);
    expect(tasks.get(1)?.title).toBe("new");
    client.close();
  });
});

describe("transactions", () => {
  /** Projects that count their tasks, a client that checks the counts at every live-query
   * callback, and a transaction that moves task 1 to p2 with both counts (task first). */
  async function counted() {
    const { gateway, open } = setup();
    gateway.commit([
      { entity: "project", id: "p1", action: "CREATE", data: { id: "p1", tasks: 2 } },
      { entity: "project", id: "p2", action: "CREATE", data: { id: "p2", tasks: 0 } },
      { entity: "task", id: "1", action: "UPDATE", data: { id: 1, title: "one", project: "p1" } },
      { entity: "task", id: "2", action: "UPDATE", data: { id: 2, title: "two", project: "p1" } },
    ]);
    const client = open();
    const tasks = client.entity("task");
    const projects = client.entity("project");
    const torn: string[] = [];
    const check = () => {
      for (const p of projects.all()) {
        const count = tasks.all().filter((t) => t.project === p.id).length;
        if (count !== p.tasks) torn.push(`${String(p.id)}: ${count} tasks, says ${String(p.tasks)}`);
      }
    };
    tasks.subscribe(undefined, check);
    projects.subscribe(undefined, check);
    await client.waitForFirstSync();
    await wait(() => expect(client.status).toBe("live"));
    gateway.pause();
    gateway.commit([
      { entity: "task", id: "1", action: "UPDATE", data: { id: 1, title: "one", project: "p2" } },
      { entity: "project", id: "p1", action: "UPDATE", data: { id: "p1", tasks: 1 } },
      { entity: "project", id: "p2", action: "UPDATE", data: { id: "p2", tasks: 1 } },
    ]);
    const socket = gateway.sockets[0]!;
    // The messages on their way: the task's first, then the projects' (the last with txEnd).
    const outbox = (socket as unknown as { outbox: { payload: { entityCode: string } }[] }).outbox;
    expect(outbox.map((m) => m.payload.entityCode)).toEqual(["task", ...outbox.slice(1).map(() => "project")]);
    const moved = async () => {
      await wait(() => expect(socket.idle && client.status === "live" && projects.get("p2")?.tasks === 1).toBe(true));
      expect(tasks.get(1)?.project).toBe("p2");
      expect(torn).toEqual([]);
      client.close();
    };
    return { gateway, socket, outbox, moved };
  }

  it("the first transaction is whole though its end comes late (the gateway said it marks ends)", async () => {
    const { gateway, socket, outbox, moved } = await counted();
    // No txEnd seen yet on this connection; the projects' messages come 30 ms after the task's.
    const rest = outbox.splice(1);
    gateway.resume();
    await wait(() => expect(socket.idle).toBe(true));
    await new Promise((resolve) => setTimeout(resolve, 30));
    rest.forEach((m) => socket.push(m as never));
    await moved();
  });

  it("a RESYNC in the middle of a transaction does not show its first half", async () => {
    const { gateway, outbox, moved } = await counted();
    outbox.splice(1, 0, { type: "RESYNC", payload: { entityCode: "project", reason: "access_changed" } } as never);
    gateway.resume();
    await wait(() => expect(gateway.snapshotTimes.length).toBe(3));
    await moved();
  });

  it("a new schema version on the message that ends a transaction still ends it", async () => {
    const { gateway, outbox, moved } = await counted();
    type Sent = { payload: { changes: { schemaVersion?: number }[]; txEnd?: boolean } };
    const last = outbox.at(-1) as unknown as Sent;
    expect(last.payload.txEnd).toBe(true);
    last.payload.changes[0]!.schemaVersion = 2;
    // Before the transaction: a message that tells the client the projects' version is 1.
    const version1 = { entityId: "p1", action: "UPDATE", data: { id: "p1", tasks: 2 }, schemaVersion: 1 };
    const known = { type: "DELTA", payload: { entityCode: "project", changes: [version1], timestamp: "t", cursor: gateway.cursor, txEnd: true } };
    outbox.unshift(known);
    gateway.resume();
    // The projects are refetched; the task's message, held for the transaction, goes with it.
    await wait(() => expect(gateway.snapshotTimes.length).toBe(3));
    await moved();
  });
});

describe("a message of no changes", () => {
  it("ends the transaction and fetches nothing, in invalidate mode too", async () => {
    const { gateway, open } = setup();
    const client = open();
    const tasks = client.entity("task", { mode: "invalidate" });
    await client.waitForFirstSync();
    await wait(() => expect(client.status).toBe("live"));
    const fetches = gateway.snapshotTimes.length;
    const socket = gateway.sockets[0]!;
    const end = { type: "INVALIDATE", payload: { entityCode: "task", changes: [], timestamp: "t", cursor: gateway.cursor, txEnd: true } };
    socket.push(end);
    await wait(() => expect(socket.idle).toBe(true));
    gateway.commit([{ entity: "task", id: "1", action: "UPDATE", data: { id: 1, title: "after" } }]);
    await wait(() => expect(tasks.get(1)?.title).toBe("after"));
    expect(gateway.snapshotTimes.length).toBe(fetches); // (this gateway sends the update's row)
    expect(gateway.sockets).toEqual([socket]);
    client.close();
  });
});

describe("sign-out", () => {
  it("closes every client of the user and deletes the database", async () => {
    const { open, db } = setup();
    const one = open();
    const other = open();
    await Promise.all([one.ready, other.ready]);
    await one.clearLocalData();
    expect(other.syncStatus.closed).toBe(true);
    expect((await indexedDB.databases()).map((d) => d.name)).not.toContain(db);
    await expect(other.entity("task").insert({ id: 9 })).rejects.toThrow(/closed/);
  });
});
