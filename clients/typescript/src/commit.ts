/**
 * Commits: what the leading tab applies at once, numbered, and passes on to the other tabs and
 * to IndexedDB. A module of their own, as the tabs' messages, the local copy, the session and
 * the leader all speak of them. Pure.
 */
import type { EntityWrite, Meta, Row } from "./store.js";

/** One change of a server row: its id and the row (null: deleted). */
export type RowChange = [string, Row | null];

/** One entity's part of a commit, applied in this order. */
export interface Item {
  entity: string;
  /** Forget the entity's rows first. */
  drop?: boolean;
  /** Rows changed, in log order: an id's last change wins. */
  changes?: RowChange[];
  /** The entity's rows are a new snapshot, stored (by the leader) with this commit, not carried here. */
  replaced?: boolean;
  /** The entity's new position (null: none). */
  meta?: Meta | null;
}

/** What the leading tab applies at once: one or more whole database transactions, a
 * snapshot or a drop, numbered in the order they happened. */
export interface Commit {
  seq: number;
  items: Item[];
}

/** Merges a commit's items into what one store transaction will write. */
export function merge(entities: Map<string, EntityWrite>, items: Item[]): void {
  for (const item of items) {
    let write = entities.get(item.entity);
    if (!write) entities.set(item.entity, (write = { drop: false, rows: new Map() }));
    if (item.drop) {
      write.drop = true;
      write.rows.clear();
      write.meta = null;
    }
    for (const [id, row] of item.changes ?? []) write.rows.set(id, row);
    if (item.meta !== undefined) write.meta = item.meta;
  }
}
