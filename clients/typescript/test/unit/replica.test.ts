import { describe, expect, it } from "vitest";
import { matches, Replica } from "../../src/replica.js";
import type { Mutation } from "../../src/store.js";

const mutation = (seq: number, m: Partial<Mutation>): Mutation =>
  ({ id: `m${seq}`, seq, entityCode: "task", action: "UPDATE", entityId: "1", tab: "t", ...m });

describe("Replica", () => {
  it("lays writes over the server's rows in outbox order, and rolls one back by removing it", () => {
    const replica = new Replica();
    replica.applySynced("task", [["1", { id: 1, title: "a", status: "open" }]], []);
    const rename = mutation(2, { data: { title: "b" } });
    const close = mutation(3, { data: { status: "done" } });
    const create = mutation(1, { action: "CREATE", entityId: "2", data: { id: 2, title: "new" } });
    replica.setPending([close, rename, create]);
    expect(replica.view("task").get("1")).toEqual({ id: 1, title: "b", status: "done" });
    expect(replica.view("task").get("2")).toEqual({ id: 2, title: "new" });
    replica.setPending([close, create]);
    expect(replica.view("task").get("1")).toEqual({ id: 1, title: "a", status: "done" });
    replica.setPending([...replica.pendingMutations(), mutation(4, { action: "DELETE", entityId: "2" })]);
    expect(replica.view("task").has("2")).toBe(false);
  });

  it("keeps the server's rows apart: a confirmed write vanishes into them without a change", () => {
    const replica = new Replica();
    replica.applySynced("task", [["1", { id: 1, title: "a" }]], []);
    replica.setPending([mutation(1, { data: { title: "b" } })]);
    replica.applySynced("task", [["1", { id: 1, title: "b" }]], []);
    expect(replica.rows("task").get("1")).toEqual({ id: 1, title: "b" });
    replica.setPending([]);
    expect(replica.view("task").get("1")).toEqual({ id: 1, title: "b" });
  });

  it("tells listeners once per batch of changes, after the current task", async () => {
    const replica = new Replica();
    let calls = 0;
    replica.listen("task", () => calls++);
    replica.applySynced("task", [["1", {}]], []);
    replica.applySynced("task", [["2", {}]], []);
    expect(calls).toBe(0);
    await Promise.resolve();
    expect(calls).toBe(1);
  });
});

describe("matches", () => {
  const row = { id: 7, project_id: "7", status: "open", due: null };
  it("applies the gateway's filter operators", () => {
    expect(matches(row, [{ column: "project_id", op: "eq", value: 7 }])).toBe(true);
    expect(matches(row, [{ column: "status", op: "in", value: ["open", "blocked"] }])).toBe(true);
    expect(matches(row, [{ column: "status", op: "neq", value: "open" }])).toBe(false);
    expect(matches(row, [{ column: "id", op: "gte", value: 7 }, { column: "id", op: "lt", value: 8 }])).toBe(true);
    expect(matches(row, [{ column: "due", op: "is_null" }])).toBe(true);
    expect(matches(row, [{ column: "due", op: "neq", value: "x" }])).toBe(false);
    expect(matches(row, [{ column: "status", op: "gt", value: 1 }])).toBe(false);
    expect(matches(row, (r) => r.id === 7)).toBe(true);
  });
});
