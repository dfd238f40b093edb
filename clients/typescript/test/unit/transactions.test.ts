import { describe, expect, it } from "vitest";
import { GUARD_MS, IDLE_MS, MAX_AGE_MS, MAX_CHANGES, Transactions, type Piece } from "../../src/transactions.js";

const piece = (entity: string, cursor: string): Piece => ({ entity, cursor, changes: [{ entityId: "1", action: "UPDATE", data: {} }] });

describe("Transactions", () => {
  it("holds a transaction's messages until the one marked txEnd", () => {
    const txs = new Transactions(true);
    expect(txs.add(piece("task", "c1"), undefined, 0)).toBeUndefined();
    expect(txs.add(piece("project", "c2"), undefined, 1)).toBeUndefined();
    expect(txs.add(piece("task", "c3"), true, 2)?.map((p) => p.cursor)).toEqual(["c1", "c2", "c3"]);
    expect(txs.size).toBe(0);
  });

  it("learns that the gateway marks ends from the first txEnd", () => {
    const txs = new Transactions();
    txs.add(piece("task", "c1"), true, 0);
    expect(txs.marks).toBe(true);
    txs.add(piece("task", "c2"), undefined, 10);
    expect(txs.barrier()).toBeUndefined();
    expect(txs.expire(10 + GUARD_MS - 1)).toBeUndefined();
    expect(txs.expire(10 + GUARD_MS)?.length).toBe(1); // the guard
  });

  it("releases an unmarking gateway's messages when it pauses, before SYNCED, or when they are old", () => {
    const txs = new Transactions();
    txs.add(piece("task", "c1"), undefined, 0);
    expect(txs.deadline(0)).toBe(IDLE_MS);
    expect(txs.expire(IDLE_MS - 1)).toBeUndefined();
    expect(txs.expire(IDLE_MS)?.length).toBe(1);
    txs.add(piece("task", "c2"), undefined, 100);
    expect(txs.synced({ entity: "task", changes: [], cursor: "c3" }, 101)?.map((p) => p.cursor)).toEqual(["c2", "c3"]);
    for (let t = 200; t < 200 + MAX_AGE_MS; t += 2) expect(txs.add(piece("task", `t${t}`), undefined, t)).toBeUndefined();
    expect(txs.deadline(200 + MAX_AGE_MS)).toBe(0);
  });

  it("lets SYNCED join a marked transaction under way, and forgets an entity's pieces", () => {
    const txs = new Transactions(true);
    txs.add(piece("task", "c1"), undefined, 0);
    txs.add(piece("project", "c2"), undefined, 0);
    expect(txs.synced({ entity: "task", changes: [], cursor: "c2" }, 1)).toBeUndefined();
    txs.drop("project");
    expect(txs.add(piece("task", "c3"), true, 2)?.map((p) => p.entity + p.cursor)).toEqual(["taskc1", "taskc2", "taskc3"]);
  });

  it("ends a catch-up's transactions apart from the live stream's", () => {
    const txs = new Transactions(true);
    txs.add(piece("project", "live1"), undefined, 0); // the first part of a live transaction
    const replayOfTask = (p: Piece) => p.entity === "task";
    expect(txs.add(piece("task", "r1"), true, 1, replayOfTask)?.map((p) => p.cursor)).toEqual(["r1"]);
    expect(txs.size).toBe(1);
    const live = (p: Piece) => p.entity !== "task";
    expect(txs.add(piece("project", "live2"), true, 2, live)?.map((p) => p.cursor)).toEqual(["live1", "live2"]);
  });

  it("no longer counts the changes it forgot towards the guard", () => {
    const txs = new Transactions(true);
    const many = { ...piece("project", "c1"), changes: Array.from({ length: MAX_CHANGES - 1 }, () => piece("project", "").changes[0]!) };
    txs.add(many, undefined, 0);
    txs.drop("project");
    expect(txs.add(piece("task", "c2"), undefined, 1)).toBeUndefined();
  });
});
