import fc from "fast-check";
import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { comparator, LiveQuery, matches, run, type Condition, type Entry } from "../../src/query.js";
import type { Row } from "../../src/store.js";

/** The filter vectors the gateway runs too (tests/vectors/filters.json): one meaning of filters. */
const vectors = JSON.parse(readFileSync(new URL("../../../../tests/vectors/filters.json", import.meta.url), "utf8")) as {
  vectors: { name: string; condition: Condition; row: Row; matches: boolean }[];
};

describe("matches", () => {
  it.each(vectors.vectors)("$name", ({ condition, row, matches: expected }) => {
    expect(matches(row, [condition])).toBe(expected);
  });

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

describe("orderBy", () => {
  const rows: Entry[] = [
    ["1", { n: 10, s: "b" }],
    ["2", { n: 9, s: null }],
    ["3", { n: 10, s: "a" }],
    ["4", { n: null, s: "c" }],
  ];
  const ids = (orderBy: Parameters<typeof comparator>[0]) => [...rows].sort(comparator(orderBy)).map((e) => e[0]);

  it("sorts numbers as numbers, nulls last ascending and first descending, ties by id", () => {
    expect(ids("n")).toEqual(["2", "1", "3", "4"]);
    expect(ids({ column: "n", desc: true })).toEqual(["4", "1", "3", "2"]);
    expect(ids(["n", "s"])).toEqual(["2", "3", "1", "4"]);
    expect(ids(undefined)).toEqual(["1", "2", "3", "4"]);
  });

  it("runs a query with an order and a limit", () => {
    expect(run(rows, [{ column: "n", op: "eq", value: 10 }], { orderBy: "s", limit: 1 })).toEqual([{ n: 10, s: "a" }]);
  });
});

/** A live query must always answer what running the query afresh answers. */
describe("LiveQuery", () => {
  it("answers as a fresh query after any changes", () => {
    const change = fc.record({ id: fc.integer({ min: 0, max: 30 }), row: fc.option(fc.record({ n: fc.option(fc.integer({ min: 0, max: 5 })), s: fc.constantFrom("a", "b", "c") })) });
    fc.assert(
      fc.property(
        fc.array(change, { maxLength: 80 }),
        fc.option(fc.integer({ min: 0, max: 10 }), { nil: undefined }),
        fc.constantFrom<Parameters<typeof comparator>[0]>(undefined, "n", { column: "s", desc: true }, ["s", "n"]),
        (changes, limit, orderBy) => {
          const filter = [{ column: "s", op: "neq" as const, value: "c" }];
          const query = new LiveQuery(filter, { orderBy, limit });
          const table = new Map<string, Row>();
          query.reset(table);
          for (const { id, row } of changes) {
            const before = query.current();
            if (row) table.set(String(id), row);
            else table.delete(String(id));
            const touched = query.update(String(id), row ?? undefined);
            const now = query.current();
            // Unsorted answers follow insertion order; compare them as sets.
            const fresh = run(table, filter, { orderBy, limit });
            if (orderBy) expect(now).toEqual(fresh);
            else if (limit === undefined) expect(new Set(now)).toEqual(new Set(fresh));
            if (!touched) expect(now).toBe(before);
          }
        },
      ),
      { numRuns: 300 },
    );
  });

  it("keeps a sorted, limited query over 100,000 rows under a frame per change", () => {
    const table = new Map<string, Row>();
    for (let i = 0; i < 100_000; i++) table.set(String(i), { id: i, rank: (i * 7919) % 100_000, status: i % 3 ? "open" : "done" });
    const query = new LiveQuery([{ column: "status", op: "eq", value: "open" }], { orderBy: { column: "rank", desc: true }, limit: 50 });
    query.reset(table);
    const started = performance.now();
    for (let i = 0; i < 1000; i++) {
      const id = String((i * 31) % 100_000);
      query.update(id, { id: Number(id), rank: (i * 104729) % 100_000, status: i % 2 ? "open" : "done" });
      query.current();
    }
    const perChange = (performance.now() - started) / 1000;
    console.log(`sorted, limited live query over 100,000 rows: ${perChange.toFixed(3)} ms per change`);
    expect(perChange).toBeLessThan(16);
  });
});
