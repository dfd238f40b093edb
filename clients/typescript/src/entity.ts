/**
 * `Entity`: the application's handle on one entity (`client.entity(code)`): its rows, read
 * from this tab's memory, and writes to them, made through the client.
 */
import type { EntityOptions, Id } from "./options.js";
import type { Filter, QueryOptions } from "./query.js";
import { idOf } from "./snapshot.js";
import type { Row } from "./store.js";
import type { Writes } from "./writes.js";

export class Entity {
  constructor(
    /** The client (`SyncClient`): its rows and its writes. */
    private readonly client: Pick<Writes, "replica" | "write">,
    readonly code: string,
    readonly options: EntityOptions,
  ) {}

  /** The id of a row, as the gateway names it (`"7"`, or `["7","u1"]` for a composite key). */
  idOf(row: Row): string {
    return idOf(row, this.options.key);
  }

  /** An id given as the key's value(s) (`7`, `"7"`, `[7, "u1"]`), as the gateway names it. */
  key(id: Id): string {
    return Array.isArray(id) ? JSON.stringify(id.map(String)) : String(id);
  }

  get(id: Id): Row | undefined {
    return this.client.replica.get(this.code, this.key(id));
  }

  /** Every row (in `orderBy`'s order, at most `limit`). */
  all(options?: QueryOptions): Row[] {
    return this.client.replica.where(this.code, undefined, options);
  }

  where(filter: Filter, options?: QueryOptions): Row[] {
    return this.client.replica.where(this.code, filter, options);
  }

  /** Calls `callback` with the matching rows now and after every change that alters them
   * (once per commit, after the current task); returns the unsubscribe. */
  subscribe(filter: Filter | undefined, callback: (rows: Row[]) => void, options: QueryOptions = {}): () => void {
    return this.client.replica.watch(this.code, filter, options, callback);
  }

  insert(row: Row): Promise<string> {
    return this.client.write(this.code, "CREATE", this.idOf(row), row);
  }

  /** Sets these columns; `expect` makes the write conditional on the server's current values. */
  update(id: Id, patch: Row, options: { expect?: Row } = {}): Promise<string> {
    return this.client.write(this.code, "UPDATE", this.key(id), patch, options.expect);
  }

  delete(id: Id, options: { expect?: Row } = {}): Promise<string> {
    return this.client.write(this.code, "DELETE", this.key(id), undefined, options.expect);
  }
}
