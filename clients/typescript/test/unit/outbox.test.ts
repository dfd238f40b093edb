import fc from "fast-check";
import { afterEach, describe, expect, it, vi } from "vitest";
import { createClient } from "../../src/client.js";
import { send } from "../../src/outbox.js";
import { Store, type Mutation } from "../../src/store.js";

const mutation = (id: string): Mutation => ({ id, entityCode: "task", action: "CREATE", entityId: id, data: { id }, tab: "t" });
const answer = (status: number, body: unknown, headers: Record<string, string> = {}) =>
  Promise.resolve(new Response(JSON.stringify(body), { status, headers }));

describe("send", () => {
  it("reads what became of a batch", async () => {
    const batch = [mutation("a"), mutation("b")];
    expect(await send(batch, "c", () => answer(200, { cursor: "1.x", results: [] }))).toEqual({ kind: "applied", cursor: "1.x" });
    expect(await send(batch, "c", () => answer(409, { error: "conflict", mutation: "b", current: { id: "b" } }))).toEqual({
      kind: "refused",
      id: "b",
      status: 409,
      error: "conflict",
      current: { id: "b" },
    });
    expect(await send(batch, "c", () => answer(400, { error: "bad_request" }))).toMatchObject({ kind: "refused", id: "a" });
    expect(await send(batch, "c", () => answer(401, {}))).toEqual({ kind: "unauthorized" });
    expect(await send(batch, "c", () => answer(503, {}, { "Retry-After": "2" }))).toEqual({ kind: "retry", afterMs: 2000 });
    expect(await send(batch, "c", () => answer(429, {}))).toEqual({ kind: "retry", afterMs: undefined });
    expect(await send(batch, "c", () => Promise.reject(new TypeError("offline")))).toEqual({ kind: "retry" });
  });
});

/** The gateway's write endpoint as the outbox sees it: each mutation id applied at most once,
 * and a network that fails before or after the server applied a batch. */
class FakeGateway {
  readonly applied: string[] = [];
  constructor(private readonly behaviours: ("ok" | "down" | "lost" | "busy")[]) {}

  fetch = async (_url: string, init?: RequestInit): Promise<Response> => {
    await Promise.resolve();
    const behaviour = this.behaviours.shift() ?? "ok";
    if (behaviour === "down") throw new TypeError("network down");
    if (behaviour === "busy") return new Response("{}", { status: 503, headers: { "Retry-After": "0" } });
    const { mutations } = JSON.parse(init!.body as string) as { mutations: { id: string }[] };
    const results = mutations.map(({ id }) => {
      const fresh = !this.applied.includes(id);
      if (fresh) this.applied.push(id);
      return { id, status: fresh ? "applied" : "duplicate" };
    });
    if (behaviour === "lost") throw new TypeError("connection reset"); // applied, answer lost
    return new Response(JSON.stringify({ cursor: "1.ab.1_1__1_1", results }), { status: 200 });
  };
}

/** A socket that never opens: these tests are about the outbox alone. */
class SilentSocket {
  static readonly OPEN = 1;
  readonly readyState = 0;
  close(): void {}
}

afterEach(() => vi.unstubAllGlobals());

let run = 0;

describe("the outbox", () => {
  it("sends every write exactly once, in the order made, through failures and restarts", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.constantFrom("ok", "down", "lost", "busy"), { maxLength: 12 }),
        fc.array(fc.nat(3), { minLength: 1, maxLength: 8 }),
        async (behaviours, restarts) => {
          const gateway = new FakeGateway([...behaviours]);
          vi.stubGlobal("fetch", gateway.fetch);
          vi.stubGlobal("WebSocket", SilentSocket);
          // A database of its own per run: the user's name is in the token.
          const token = `x.${btoa(JSON.stringify({ sub: `u${run++}` }))}.y`;
          const open = () => createClient({ url: "http://gateway", token, retry: { baseMs: 1, capMs: 4 } });
          let client = open();
          const written: string[] = [];
          // Writes in rounds; after each round but the last, the tab may close and reopen
          // mid-flight (the outbox is in IndexedDB).
          for (const [round, writes] of restarts.entries()) {
            for (let i = 0; i <= writes; i++) {
              await client.entity("task").insert({ id: `${round}-${i}` });
              written.push(`${round}-${i}`);
            }
            if (round < restarts.length - 1 && writes % 2 === 0) {
              client.close();
              client = open();
            }
          }
          await vi.waitFor(() => expect(client.pendingWrites).toBe(0), { timeout: 5000, interval: 5 });
          // Each write waits for the stream to bring it back; the server applied each once, in order.
          expect(client.replica.pendingMutations().map((m) => m.entityId)).toEqual(written);
          client.close();
          const byId = new Map(client.replica.pendingMutations().map((m) => [m.id, m.entityId]));
          expect(gateway.applied.map((id) => byId.get(id))).toEqual(written);
        },
      ),
      { numRuns: 40 },
    );
  });
});

describe("the stored outbox", () => {
  // A write settled while its cursor was being stored must stay gone: put back, it was laid
  // over the server's newer row in every tab that read the outbox again (a browser test saw a
  // follower tab keep a task's version of 6 steps before).
  it("does not take back a mutation settled meanwhile", async () => {
    const store = await Store.open(`outbox-${Math.random()}`, () => {}, () => {});
    const m = mutation("a");
    m.seq = await store.enqueue(m);
    await store.removeMutations([m.seq]);
    await store.updateMutation({ ...m, cursor: "1.x" });
    expect(await store.outbox()).toEqual([]);
    const n = mutation("b");
    n.seq = await store.enqueue(n);
    await store.updateMutation({ ...n, cursor: "1.y" });
    expect(await store.outbox()).toEqual([{ ...n, cursor: "1.y" }]);
  });
});
