/**
 * The rows a tab reads, for the entities this tab opened (and no others): the server's rows
 * as the stream last brought them, with this device's writes that are not settled yet laid
 * over them in the order they were made. The two are kept apart so that a refused write rolls
 * back by being removed, and a settled one disappears into the server's row.
 *
 * Live queries are told once per batch of changes, after the current task, so a commit that
 * touches several entities is seen whole by every query (see `Commit` in commit.ts).
 */
import { LiveQuery, run, type Entry, type Filter, type QueryOptions } from "./query.js";
import type { Mutation, Row } from "./store.js";

/** A row with this mutation applied (undefined: deleted). */
function applyMutation(row: Row | undefined, m: Mutation): Row | undefined {
  if (m.action === "DELETE") return undefined;
  return m.action === "CREATE" ? { ...m.data } : { ...row, ...m.data };
}

interface Watch {
  query: LiveQuery;
  callback: (rows: Row[]) => void;
}

interface Held {
  /** The server's rows. */
  rows: Map<string, Row>;
  /** This device's unsettled writes by id, in outbox order. */
  overlay: Map<string, Mutation[]>;
  watches: Set<Watch>;
}

export class Replica {
  private readonly held = new Map<string, Held>();
  private pending: Mutation[] = [];
  private readonly watches = new Map<string, Set<Watch>>();
  private readonly dirty = new Set<Watch>();
  private scheduled = false;

  /** Whether this tab holds the entity's rows. */
  has(entity: string): boolean {
    return this.held.has(entity);
  }

  /** The entity's server rows from now on (a first load, a new snapshot): every query starts again. */
  load(entity: string, rows: Map<string, Row>): void {
    const held: Held = { rows, overlay: new Map(), watches: this.watchesOf(entity) };
    this.held.set(entity, held);
    this.overlay(entity, held);
    for (const watch of held.watches) this.reset(watch, entity);
  }

  /** Forgets the entity's server rows (its subscription ended, the user's rights changed). */
  drop(entity: string): void {
    if (this.held.has(entity)) this.load(entity, new Map());
  }

  /** One change of a server row (null: deleted), in log order: the last change of an id wins. */
  put(entity: string, id: string, row: Row | null): void {
    const held = this.held.get(entity);
    if (!held) return;
    if (row) held.rows.set(id, row);
    else held.rows.delete(id);
    if (held.watches.size) this.changed(held, id);
  }

  /** The writes not settled yet, in outbox order. */
  setPending(mutations: readonly Mutation[]): void {
    const touched = new Map<string, Set<string>>();
    for (const m of [...this.pending, ...mutations]) {
      let ids = touched.get(m.entityCode);
      if (!ids) touched.set(m.entityCode, (ids = new Set()));
      ids.add(m.entityId);
    }
    this.pending = [...mutations].sort((a, b) => (a.seq ?? Infinity) - (b.seq ?? Infinity));
    for (const [entity, ids] of touched) {
      const held = this.held.get(entity);
      if (!held) continue;
      this.overlay(entity, held);
      if (held.watches.size) ids.forEach((id) => this.changed(held, id));
    }
  }

  pendingMutations(): readonly Mutation[] {
    return this.pending;
  }

  /** The row as this tab shows it: the server's, with unsettled writes over it. */
  get(entity: string, id: string): Row | undefined {
    const held = this.held.get(entity);
    return held && this.view(held, id);
  }

  /** Every row as this tab shows it. */
  *entries(entity: string): Generator<Entry> {
    const held = this.held.get(entity);
    if (!held) return;
    for (const entry of held.rows) {
      if (!held.overlay.has(entry[0])) yield entry;
    }
    for (const id of held.overlay.keys()) {
      const row = this.view(held, id);
      if (row) yield [id, row];
    }
  }

  where(entity: string, filter: Filter | undefined, options?: QueryOptions): Row[] {
    return run(this.entries(entity), filter, options);
  }

  /** Calls `callback` with the query's answer now and whenever it changes (after the current
   * task, once per batch of changes); returns the unsubscribe. */
  watch(entity: string, filter: Filter | undefined, options: QueryOptions, callback: (rows: Row[]) => void): () => void {
    const watch: Watch = { query: new LiveQuery(filter, options), callback };
    const set = this.watchesOf(entity);
    set.add(watch);
    this.reset(watch, entity);
    this.dirty.delete(watch);
    callback(watch.query.current());
    return () => {
      set.delete(watch);
      this.dirty.delete(watch);
    };
  }

  private watchesOf(entity: string): Set<Watch> {
    let set = this.watches.get(entity);
    if (!set) this.watches.set(entity, (set = new Set()));
    return set;
  }

  private reset(watch: Watch, entity: string): void {
    watch.query.reset(this.entries(entity));
    this.mark(watch);
  }

  private view(held: Held, id: string): Row | undefined {
    const mine = held.overlay.get(id);
    let row = held.rows.get(id);
    if (mine) for (const m of mine) row = applyMutation(row, m);
    return row;
  }

  private overlay(entity: string, held: Held): void {
    held.overlay.clear();
    for (const m of this.pending) {
      if (m.entityCode !== entity) continue;
      const list = held.overlay.get(m.entityId);
      if (list) list.push(m);
      else held.overlay.set(m.entityId, [m]);
    }
  }

  private changed(held: Held, id: string): void {
    const row = this.view(held, id);
    for (const watch of held.watches) if (watch.query.update(id, row)) this.mark(watch);
  }

  private mark(watch: Watch): void {
    this.dirty.add(watch);
    if (this.scheduled) return;
    this.scheduled = true;
    queueMicrotask(() => {
      this.scheduled = false;
      const due = [...this.dirty];
      this.dirty.clear();
      for (const watch of due) watch.callback(watch.query.current());
    });
  }
}
