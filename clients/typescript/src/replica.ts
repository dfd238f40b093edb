/**
 * The rows a tab reads: the server's rows (as the stream last brought them) with this
 * device's writes that the stream has not brought back yet laid over them, in the order they
 * were made. The two are kept apart so that a rejected write rolls back by being removed, and
 * a confirmed one disappears into the server's row without a flicker: its overlay is dropped
 * only once the stream has passed the write (see `Mutation.cursor`).
 */
import type { Mutation, Row } from "./store.js";

/** Local queries: a predicate, or conditions all of which a row meets (SPEC 2.3's filters). */
export type Filter = ((row: Row) => boolean) | Condition[];

export interface Condition {
  column: string;
  op: "eq" | "neq" | "lt" | "lte" | "gt" | "gte" | "in" | "is_null" | "not_null";
  value?: unknown;
}

export function matches(row: Row, filter: Filter): boolean {
  if (typeof filter === "function") return filter(row);
  return filter.every(({ column, op, value }) => {
    const v = row[column];
    switch (op) {
      case "is_null":
        return v === null || v === undefined;
      case "not_null":
        return v !== null && v !== undefined;
      case "in":
        return Array.isArray(value) && value.some((x) => same(v, x));
      case "eq":
        return same(v, value);
      case "neq":
        return v !== null && v !== undefined && !same(v, value);
      default:
        return v !== null && v !== undefined && compare(v, value, op);
    }
  });
}

/** A value as text, as the gateway compares values: a number and its text alike. */
const text = (v: unknown): string =>
  typeof v === "string" ? v : typeof v === "number" || typeof v === "boolean" ? `${v}` : JSON.stringify(v);

/** Equal as the gateway compares: by value, a number and its text alike. */
function same(a: unknown, b: unknown): boolean {
  return a === b || (a !== null && b !== null && text(a) === text(b));
}

function compare(a: unknown, b: unknown, op: string): boolean {
  const [x, y] = typeof a === "number" || typeof b === "number" ? [Number(a), Number(b)] : [text(a), text(b)];
  if (typeof x === "number" && Number.isNaN(x)) return false;
  if (typeof y === "number" && Number.isNaN(y)) return false;
  return op === "lt" ? x < y : op === "lte" ? x <= y : op === "gt" ? x > y : x >= y;
}

/** A row with this mutation applied (undefined: deleted). */
function applyMutation(row: Row | undefined, m: Mutation): Row | undefined {
  if (m.action === "DELETE") return undefined;
  return m.action === "CREATE" ? { ...m.data } : { ...row, ...m.data };
}

export class Replica {
  private readonly synced = new Map<string, Map<string, Row>>();
  private pending: Mutation[] = [];
  /** Each entity's rows with the overlay, made on first read after a change. */
  private readonly views = new Map<string, Map<string, Row>>();
  private readonly listeners = new Map<string, Set<() => void>>();
  private readonly changed = new Set<string>();
  private notifying = false;

  rows(entity: string): Map<string, Row> {
    let rows = this.synced.get(entity);
    if (!rows) this.synced.set(entity, (rows = new Map<string, Row>()));
    return rows;
  }

  /** The server's changes to an entity. */
  applySynced(entity: string, puts: Iterable<[string, Row]>, deletes: Iterable<string>): void {
    const rows = this.rows(entity);
    for (const [id, row] of puts) rows.set(id, row);
    for (const id of deletes) rows.delete(id);
    this.touch(entity);
  }

  /** Forgets an entity's server rows (it is fetched again). */
  clear(entity: string): void {
    this.synced.delete(entity);
    this.touch(entity);
  }

  /** The writes not yet brought back by the stream, in outbox order. */
  setPending(mutations: Mutation[]): void {
    const entities = new Set([...this.pending, ...mutations].map((m) => m.entityCode));
    this.pending = [...mutations].sort((a, b) => (a.seq ?? Infinity) - (b.seq ?? Infinity));
    entities.forEach((e) => this.touch(e));
  }

  pendingMutations(): readonly Mutation[] {
    return this.pending;
  }

  view(entity: string): Map<string, Row> {
    let view = this.views.get(entity);
    if (view) return view;
    const mine = this.pending.filter((m) => m.entityCode === entity);
    const synced = this.rows(entity);
    if (mine.length === 0) {
      view = synced;
    } else {
      view = new Map<string, Row>(synced);
      for (const m of mine) {
        const row = applyMutation(view.get(m.entityId), m);
        if (row) view.set(m.entityId, row);
        else view.delete(m.entityId);
      }
    }
    this.views.set(entity, view);
    return view;
  }

  /** Calls `listener` (batched, after the current task) whenever the entity's view changes. */
  listen(entity: string, listener: () => void): () => void {
    let set = this.listeners.get(entity);
    if (!set) this.listeners.set(entity, (set = new Set()));
    set.add(listener);
    return () => set.delete(listener);
  }

  private touch(entity: string): void {
    this.views.delete(entity);
    this.changed.add(entity);
    if (this.notifying) return;
    this.notifying = true;
    queueMicrotask(() => {
      this.notifying = false;
      const entities = [...this.changed];
      this.changed.clear();
      for (const e of entities) this.listeners.get(e)?.forEach((l) => l());
    });
  }
}
