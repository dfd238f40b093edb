/**
 * The durable half of the client: one IndexedDB database per user and gateway, through `idb`.
 * - `rows`: key `[entity, id]`, value the row as the server last sent it (never optimistic);
 * - `meta`: key `entity`, value `{cursor, schemaVersion}`: where the entity's stream stands;
 * - `outbox`: the writes not yet confirmed, in the order they were made (an autoincrement key).
 * A row change and its cursor are written in one transaction, and every write resolves only
 * when its transaction completes, so a crash leaves rows and cursor in agreement.
 *
 * When the browser refuses to store more (QuotaExceededError) or IndexedDB fails, the store
 * reports it once and stops writing; the client goes on from memory.
 */
import { openDB, type DBSchema, type IDBPDatabase } from "idb";

export type Row = Record<string, unknown>;

export interface Meta {
  cursor: string;
  schemaVersion?: number;
}

export type Action = "CREATE" | "UPDATE" | "DELETE";

/** A write made on this device, until the stream has brought back its effect. */
export interface Mutation {
  /** The idempotency key of `/v1/write`. */
  id: string;
  entityCode: string;
  action: Action;
  entityId: string;
  data?: Row;
  expect?: Row;
  /** The tab that made it (its callbacks are told what became of it). */
  tab: string;
  /** The outbox position: the order writes are sent in. */
  seq?: number;
  /** Set once the server applied it: the stream reaching this cursor ends the mutation. */
  cursor?: string;
}

interface Schema extends DBSchema {
  rows: { key: [string, string]; value: Row };
  meta: { key: string; value: Meta };
  outbox: { key: number; value: Mutation };
}

/** The key range of one entity's rows: `[entity]` < `[entity, id]` < `[entity, []]`. */
const entityRange = (entity: string) => IDBKeyRange.bound([entity], [entity, []]);

export class Store {
  private failed = false;

  private constructor(
    private readonly db: IDBPDatabase<Schema> | undefined,
    private readonly onError: (error: unknown) => void,
  ) {}

  static async open(name: string, onError: (error: unknown) => void): Promise<Store> {
    try {
      const db = await openDB<Schema>(name, 1, {
        upgrade(db) {
          db.createObjectStore("rows");
          db.createObjectStore("meta");
          db.createObjectStore("outbox", { keyPath: "seq", autoIncrement: true });
        },
      });
      return new Store(db, onError);
    } catch (error) {
      onError(error);
      return new Store(undefined, onError);
    }
  }

  close(): void {
    this.db?.close();
  }

  /** The stored rows and outbox, to start from (positions are the leader's: `meta`). */
  async load(): Promise<{ rows: Map<string, Map<string, Row>>; outbox: Mutation[] }> {
    const rows = new Map<string, Map<string, Row>>();
    if (!this.db) return { rows, outbox: [] };
    const tx = this.db.transaction(["rows", "outbox"]);
    const [keys, values, outbox] = await Promise.all([
      tx.objectStore("rows").getAllKeys(),
      tx.objectStore("rows").getAll(),
      tx.objectStore("outbox").getAll(),
    ]);
    keys.forEach(([entity, id], i) => {
      let entityRows = rows.get(entity);
      if (!entityRows) rows.set(entity, (entityRows = new Map<string, Row>()));
      entityRows.set(id, values[i] as Row);
    });
    return { rows, outbox };
  }

  /** Rows put and deleted, and the entity's new position, in one transaction. */
  async apply(entity: string, puts: [string, Row][], deletes: string[], meta: Meta | undefined): Promise<void> {
    await this.write(["rows", "meta"], (tx) => {
      const rows = tx.objectStore("rows");
      for (const [id, row] of puts) void rows.put(row, [entity, id]);
      for (const id of deletes) void rows.delete([entity, id]);
      if (meta) void tx.objectStore("meta").put(meta, entity);
    });
  }

  /** Forgets an entity's rows and position (it is fetched again); the outbox stays. */
  async dropEntity(entity: string): Promise<void> {
    await this.write(["rows", "meta"], (tx) => {
      void tx.objectStore("rows").delete(entityRange(entity));
      void tx.objectStore("meta").delete(entity);
    });
  }

  /** Adds a mutation to the outbox; returns its position. */
  async enqueue(mutation: Mutation): Promise<number | undefined> {
    let seq: number | undefined;
    await this.write(["outbox"], async (tx) => {
      seq = await tx.objectStore("outbox").add(mutation);
    });
    return seq;
  }

  async updateMutation(mutation: Mutation): Promise<void> {
    await this.write(["outbox"], (tx) => void tx.objectStore("outbox").put(mutation));
  }

  async removeMutation(seq: number | undefined): Promise<void> {
    if (seq !== undefined) await this.write(["outbox"], (tx) => void tx.objectStore("outbox").delete(seq));
  }

  /** The outbox as stored; undefined once storage failed (memory is then the truth). */
  async outbox(): Promise<Mutation[] | undefined> {
    return this.db && !this.failed ? this.db.getAll("outbox") : undefined;
  }

  async meta(): Promise<Map<string, Meta>> {
    const meta = new Map<string, Meta>();
    if (!this.db) return meta;
    const tx = this.db.transaction("meta");
    const [keys, values] = await Promise.all([tx.store.getAllKeys(), tx.store.getAll()]);
    keys.forEach((entity, i) => meta.set(entity, values[i]!));
    return meta;
  }

  private async write<S extends ("rows" | "meta" | "outbox")[]>(
    stores: S,
    work: (tx: import("idb").IDBPTransaction<Schema, S, "readwrite">) => unknown,
  ): Promise<void> {
    if (!this.db || this.failed) return;
    try {
      const tx = this.db.transaction(stores, "readwrite");
      await work(tx);
      await tx.done;
    } catch (error) {
      this.failed = true; // from here on, memory only
      this.onError(error);
    }
  }
}
