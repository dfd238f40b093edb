/**
 * The durable half of the client: one IndexedDB database per user and gateway, through `idb`.
 * - `rows`: key `[entity, id]`, value the row as the server last sent it (never optimistic);
 * - `meta`: key `entity`, value where the entity's stream stands (`Meta`);
 * - `outbox`: the writes not yet settled, in the order they were made (an autoincrement key);
 * - `refusals`: writes the server refused (409, 403, 400) that no tab has been told of yet;
 * - `state`: `seq`, the last commit stored (see `Commit`), and `claims`, what the token said
 *   when the rows were fetched.
 * A commit's rows and cursors are written in one transaction, and every write resolves only
 * when its transaction completes, so a crash leaves rows and cursors in agreement.
 *
 * When the browser refuses to store more (QuotaExceededError) or IndexedDB fails, the store
 * reports it once and stops writing; the client goes on from memory. When another tab deletes
 * the database (sign-out), the connection closes at once (`onGone`), so the deletion is never
 * blocked by this tab.
 */
import { openDB, type DBSchema, type IDBPDatabase, type IDBPTransaction, type StoreNames } from "idb";

export type Row = Record<string, unknown>;

export interface Meta {
  cursor: string;
  schemaVersion?: number;
  /** The entity's key columns and mode, so that any tab can lead it. */
  key?: string | string[];
  mode?: "delta" | "invalidate";
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
  /** Set once the server applied it: the stream reaching this cursor settles the mutation. */
  cursor?: string;
}

/** A write the server refused for good, kept until a tab is told. */
export interface StoredRefusal {
  key?: number;
  mutation: Mutation;
  status: number;
  error: string;
  current?: Row;
}

/** One entity's part of what is written in one transaction, in this order: `drop` (forget
 * the entity's rows and position), the rows (null: deleted), the position (null: none). */
export interface EntityWrite {
  drop: boolean;
  rows: Map<string, Row | null>;
  meta?: Meta | null;
}

interface Schema extends DBSchema {
  rows: { key: [string, string]; value: Row };
  meta: { key: string; value: Meta };
  outbox: { key: number; value: Mutation };
  refusals: { key: number; value: StoredRefusal };
  state: { key: string; value: unknown };
}

type Name = StoreNames<Schema>;

/** The key range of one entity's rows: `[entity]` < `[entity, id]` < `[entity, []]`. */
const entityRange = (entity: string) => IDBKeyRange.bound([entity], [entity, []]);

export class Store {
  private failed = false;

  private constructor(
    private readonly db: IDBPDatabase<Schema> | undefined,
    private readonly onError: (error: unknown) => void,
  ) {}

  /** `onGone(deleted)`: another tab deletes the database (sign-out) or opens a newer version;
   * this connection is closed so as not to block it. */
  static async open(name: string, onError: (error: unknown) => void, onGone: (deleted: boolean) => void): Promise<Store> {
    try {
      let store: Store | undefined;
      const db = await openDB<Schema>(name, 2, {
        upgrade(db, version) {
          if (version < 1) {
            db.createObjectStore("rows");
            db.createObjectStore("meta");
            db.createObjectStore("outbox", { keyPath: "seq", autoIncrement: true });
          }
          db.createObjectStore("refusals", { keyPath: "key", autoIncrement: true });
          db.createObjectStore("state");
        },
        // Another tab deletes or upgrades the database: let it.
        blocking(_current, next) {
          store?.close();
          onGone(next === null);
        },
      });
      return (store = new Store(db, onError));
    } catch (error) {
      onError(error);
      return new Store(undefined, onError);
    }
  }

  /** False when storage failed: memory is the truth from then on. */
  get working(): boolean {
    return !!this.db && !this.failed;
  }

  close(): void {
    this.failed = true;
    this.db?.close();
  }

  /** Entities' stored rows and positions, and the last commit they include, in one transaction. */
  async entities(codes: string[]): Promise<{ rows: Map<string, Map<string, Row>>; meta: Map<string, Meta>; seq: number } | undefined> {
    if (!this.working) return undefined;
    try {
      const tx = this.db!.transaction(["rows", "meta", "state"]);
      const store = tx.objectStore("rows");
      const rows = new Map<string, Map<string, Row>>();
      const meta = new Map<string, Meta>();
      const [, seq] = await Promise.all([
        Promise.all(
          codes.map(async (code) => {
            // Rows without a position are a snapshot being stored, or cut short: not read.
            const position = await tx.objectStore("meta").get(code);
            const map = new Map<string, Row>();
            rows.set(code, map);
            if (!position) return;
            meta.set(code, position);
            const [keys, values] = await Promise.all([store.getAllKeys(entityRange(code)), store.getAll(entityRange(code))]);
            keys.forEach((key, i) => map.set(key[1], values[i]!));
          }),
        ),
        tx.objectStore("state").get("seq"),
      ]);
      return { rows, meta, seq: (seq as number | undefined) ?? 0 };
    } catch (error) {
      this.fail(error);
      return undefined;
    }
  }

  /** Every entity's position, the last commit stored and the claims of the stored rows. */
  async state(): Promise<{ meta: Map<string, Meta>; seq: number; claims?: string }> {
    const meta = new Map<string, Meta>();
    if (!this.working) return { meta, seq: 0 };
    const tx = this.db!.transaction(["meta", "state"]);
    const [keys, values, seq, claims] = await Promise.all([
      tx.objectStore("meta").getAllKeys(),
      tx.objectStore("meta").getAll(),
      tx.objectStore("state").get("seq"),
      tx.objectStore("state").get("claims"),
    ]);
    keys.forEach((entity, i) => meta.set(entity, values[i]!));
    return { meta, seq: (seq as number | undefined) ?? 0, claims: claims as string | undefined };
  }

  /** Entities' rows and positions, and `seq`, in one transaction. */
  async write(entities: Map<string, EntityWrite>, seq?: number, claims?: string): Promise<void> {
    await this.run(["rows", "meta", "state"], (tx) => {
      const rows = tx.objectStore("rows");
      const meta = tx.objectStore("meta");
      for (const [entity, write] of entities) {
        if (write.drop) {
          void rows.delete(entityRange(entity));
          void meta.delete(entity);
        }
        for (const [id, row] of write.rows) void (row ? rows.put(row, [entity, id]) : rows.delete([entity, id]));
        if (write.meta) void meta.put(write.meta, entity);
        else if (write.meta === null) void meta.delete(entity);
      }
      if (seq !== undefined) void tx.objectStore("state").put(seq, "seq");
      if (claims !== undefined) void tx.objectStore("state").put(claims, "claims");
    });
  }

  /** Adds a mutation to the outbox; returns its position. */
  async enqueue(mutation: Mutation): Promise<number | undefined> {
    let seq: number | undefined;
    await this.run(["outbox"], async (tx) => {
      seq = await tx.objectStore("outbox").add(mutation);
    });
    return seq;
  }

  /** Stores what was learnt of a mutation (its cursor), unless it is gone: settled or refused
   * meanwhile. Putting it back would leave a write no stream ever settles, laid over the
   * server's newer rows in every tab that reads the outbox. */
  async updateMutation(mutation: Mutation): Promise<void> {
    await this.run(["outbox"], async (tx) => {
      const outbox = tx.objectStore("outbox");
      if (mutation.seq !== undefined && (await outbox.get(mutation.seq))) await outbox.put(mutation);
    });
  }

  async removeMutations(seqs: (number | undefined)[]): Promise<void> {
    await this.run(["outbox"], (tx) => seqs.forEach((seq) => seq !== undefined && void tx.objectStore("outbox").delete(seq)));
  }

  /** The outbox as stored; undefined once storage failed (memory is then the truth). */
  async outbox(): Promise<Mutation[] | undefined> {
    return this.working ? this.db!.getAll("outbox").catch(() => undefined) : undefined;
  }

  /** A refused write settles its mutation and is kept until a tab is told, in one transaction. */
  async refuse(refusal: StoredRefusal): Promise<void> {
    await this.run(["outbox", "refusals"], (tx) => {
      if (refusal.mutation.seq !== undefined) void tx.objectStore("outbox").delete(refusal.mutation.seq);
      void tx.objectStore("refusals").add(refusal);
    });
  }

  async refusals(): Promise<StoredRefusal[]> {
    return this.working ? this.db!.getAll("refusals").catch(() => []) : [];
  }

  /** Takes a refusal to report it: true for the one tab that took it. */
  async claimRefusal(key: number): Promise<boolean> {
    let mine = false;
    await this.run(["refusals"], async (tx) => {
      const store = tx.objectStore("refusals");
      if ((await store.count(key)) > 0) {
        mine = true;
        await store.delete(key);
      }
    });
    return mine;
  }

  private async run<S extends Name[]>(stores: S, work: (tx: IDBPTransaction<Schema, S, "readwrite">) => unknown): Promise<void> {
    if (!this.working) return;
    try {
      const tx = this.db!.transaction(stores, "readwrite");
      await Promise.all([work(tx), tx.done]);
    } catch (error) {
      this.fail(error);
    }
  }

  /** Stops writing after `error` (the client goes on from memory). */
  abandon(error: unknown): void {
    this.fail(error);
  }

  private fail(error: unknown): void {
    if (this.failed) return;
    this.failed = true; // from here on, memory only
    this.onError(error);
  }
}
