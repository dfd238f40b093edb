/**
 * `createClient`: a live local copy of tracked entities in IndexedDB, kept current over one
 * WebSocket per browser profile, with writes applied at once and sent from a durable outbox.
 *
 * One tab of the profile leads (a Web Lock): it owns the socket, the snapshots, the stored
 * rows and cursors and the outbox drain. What it receives becomes numbered commits (`Commit`):
 * each whole database transaction (see transactions.ts), applied to its memory at once, told
 * to the other tabs over a BroadcastChannel, and written to IndexedDB in one transaction
 * behind. Every tab holds in memory only the entities it opened, loaded from IndexedDB plus
 * the commits not stored yet; any tab may write (into the shared outbox). When the leading tab
 * closes, its lock passes to another tab, which stores what the old leader told but did not
 * store, and resumes the stream from the stored cursors.
 */
import { fullJitter, retryAfterMs, retryDelay } from "./backoff.js";
import { reaches } from "./cursor.js";
import { BATCH, send } from "./outbox.js";
import type { Filter, QueryOptions } from "./query.js";
import { Replica } from "./replica.js";
import { idOf, readSnapshot, rowsOf, storeInWorker, yieldToPage } from "./snapshot.js";
import { derive, sameStatus, type EntityStatus, type Facts, type Status, type SyncStatus } from "./status.js";
import { deleteDB } from "idb";
import { Store, type Action, type EntityWrite, type Meta, type Mutation, type Row, type StoredRefusal } from "./store.js";
import { MAX_CHANGES, Transactions, type Piece } from "./transactions.js";

export interface ClientOptions {
  /** The gateway, e.g. `https://sync.example.com` (the socket is `/ws/sync` there). */
  url: string;
  token?: string;
  /** Called for a token at start and before the current one expires. */
  getToken?: () => string | Promise<string>;
  /** The origin tag of this profile's writes (default: one made up and kept per profile). */
  clientId?: string;
  /** A write the server refused because the row was not as expected (409). Its optimistic
   * state is already rolled back (the server wins); write again to merge. Same as
   * `client.onConflict(handler)`. */
  onConflict?: (conflict: Refusal) => void;
  /** A write refused by row-level security, privileges or as malformed (403, 400). */
  onRejected?: (rejection: Refusal) => void;
  /** Failures that do not stop the client: storage refused (it goes on from memory), an entity
   * that cannot be fetched, a socket that failed. */
  onError?: (error: unknown) => void;
  /** Retries (reconnects, writes, snapshots) wait a random time up to `baseMs`·2^attempt, at
   * most `capMs` (defaults 1 s and 32 s), and never less than a server's `Retry-After`. */
  retry?: { baseMs?: number; capMs?: number };
  /** Store snapshots from a Web Worker (default true; without one, or where workers cannot
   * start, the page stores them). */
  worker?: boolean;
}

export interface Refusal {
  mutation: Mutation;
  status: number;
  error: string;
  /** For a conflict: the row as it is on the server. */
  current?: Row;
}

export interface EntityOptions {
  /** The key column(s), as the gateway forms entity ids (default `id`). */
  key?: string | string[];
  /** `delta` (default): changes carry the rows; `invalidate`: changed rows are fetched again. */
  mode?: "delta" | "invalidate";
}

/** An entity id: the key's value (`7`, `"7"`, a uuid) or, for a composite key, its values in order. */
export type Id = string | number | (string | number)[];

/** One change of a server row: its id and the row (null: deleted). */
type RowChange = [string, Row | null];

/** One entity's part of a commit, applied in this order. */
interface Item {
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
interface Commit {
  seq: number;
  items: Item[];
}

/** What the tabs tell each other. */
type Note =
  | { t: "commit"; commit: Commit }
  | { t: "stored"; seq: number }
  | { t: "status"; status: SyncStatus }
  | { t: "hello" }
  | { t: "lead" }
  | { t: "outbox" }
  | { t: "refused" }
  | { t: "need"; entity: string; options: EntityOptions }
  | { t: "signout" };

interface Change {
  entityId: string;
  action: string;
  data?: Row;
  schemaVersion?: number;
}

/** An HTTP answer that was not a success. */
class HttpError extends Error {
  constructor(
    readonly status: number,
    what: string,
    readonly retryAfter?: number,
  ) {
    super(`${what}: HTTP ${status}`);
  }
}

const PING_EVERY_MS = 15000;
/** After the browser says it went offline, a socket that does not answer a PING within this is closed. */
const PROBE_MS = 5000;
/** Rows per IndexedDB transaction when the page stores a snapshot (a task of a few ms each). */
const PAGE_BATCH = 1000;

const sleep = (ms: number, wake?: AbortSignal) =>
  new Promise<void>((resolve) => {
    const timer = setTimeout(resolve, ms);
    wake?.addEventListener("abort", () => (clearTimeout(timer), resolve()), { once: true });
  });

type Claims = { sub?: string; exp?: number } & Record<string, unknown>;

/** The claims of a JWT (unverified: only to name the local database and plan refreshes). */
function claims(token: string): Claims {
  try {
    const part = token.split(".")[1] ?? "";
    return JSON.parse(atob(part.replace(/-/g, "+").replace(/_/g, "/"))) as Claims;
  } catch {
    return {};
  }
}

/** What decides which rows a token may see: every claim but the times and the token's id. */
function access(token: string): string {
  const all = claims(token);
  return JSON.stringify(
    Object.keys(all)
      .filter((k) => !["exp", "iat", "nbf", "jti"].includes(k))
      .sort()
      .map((k) => [k, all[k]]),
  );
}

export class Entity {
  constructor(
    private readonly client: SyncClient,
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

export class SyncClient {
  readonly replica = new Replica();
  /** Resolves once the local database is open and the outbox loaded (rows may still be
   * loading or never fetched: see `waitForFirstSync`). */
  readonly ready: Promise<void>;
  private readonly entities = new Map<string, Entity>();
  private readonly tab = crypto.randomUUID();
  private readonly base: string;
  private store!: Store;
  private sub = "";
  private name = "";
  private channel?: BroadcastChannel;
  private token = "";
  private clientId = "";
  private leading = false;
  private closed = false;
  /** Releases the Web Locks this tab holds. */
  private readonly releases: (() => void)[] = [];
  private readonly timers = new Set<ReturnType<typeof setTimeout>>();

  // ---- commits, in every tab ----------------------------------------------------------
  /** The last commit applied to this tab's memory. */
  private applied = 0;
  /** The last commit known to be stored. */
  private storedSeq = 0;
  /** Commits applied and not known to be stored: what a load from IndexedDB lacks. */
  private recent: Commit[] = [];
  private loading = 0;
  /** The entities this tab holds: loaded, being loaded, or stale until commit n is stored. */
  private readonly loads = new Map<string, "loading" | "loaded" | number>();
  /** Entities whose rows in this tab's memory are a whole sync (not nothing yet). */
  private readonly syncedHere = new Set<string>();
  private readonly waiters = new Set<() => void>();
  private readonly toLoad = new Set<string>();
  private readonly whenLoaded: (() => void)[] = [];

  // ---- status and refusals ------------------------------------------------------------
  private current: SyncStatus;
  private readonly statusListeners = new Set<(status: Status, detail: SyncStatus) => void>();
  private readonly conflictHandlers = new Set<(refusal: Refusal) => void>();
  private readonly rejectedHandlers = new Set<(refusal: Refusal) => void>();
  /** Refusals when storage failed (memory is the truth). */
  private readonly unstoredRefusals: StoredRefusal[] = [];

  // ---- the leader's -------------------------------------------------------------------
  private seq = 0;
  private readonly meta = new Map<string, Meta>();
  /** The entities the socket serves (for every tab), with their options. */
  private readonly followed = new Map<string, EntityOptions>();
  /** Entities the user may not read (ERROR forbidden, 403): not followed until the claims change. */
  private readonly forbidden = new Set<string>();
  /** Entities to fetch again (RESYNC, a new schema version). */
  private readonly fresh = new Set<string>();
  private readonly attempts = new Map<string, number>();
  private readonly facts: Facts = {
    online: true,
    socket: "opening",
    failed: false,
    entities: {},
    uploading: false,
    pendingWrites: 0,
    closed: false,
  };
  private socket?: WebSocket;
  private lastPong = 0;
  private readonly subscribing = new Set<string>();
  private readonly subscribed = new Set<string>();
  /** Entities caught up (SYNCED) on this socket. */
  private readonly liveHere = new Set<string>();
  private readonly hydrating = new Set<string>();
  private readonly txs = new Transactions();
  /** Whole transactions held while the socket catches up. */
  private caughtUp: Piece[] = [];
  private txTimer?: ReturnType<typeof setTimeout>;
  private authTimer?: ReturnType<typeof setTimeout>;
  /** Socket messages are handled one after the other, in order. */
  private queue: Promise<void> = Promise.resolve();
  private draining = false;
  /** Wakes a waiting reconnect or retry (the browser came online). */
  private wake = new AbortController();
  /** The server asked to reconnect after this many ms (RECONNECT). */
  private reconnectAfter?: number;
  private awaits = 0;
  private awaitUnsupported = false;
  /** Store writes run one after the other; commits not yet written are merged in `unwritten`. */
  private writing: Promise<void> = Promise.resolve();
  private unwritten?: { seq: number; entities: Map<string, EntityWrite> };
  /** What the token allowed when the stored rows were fetched (see `access`). */
  private accessSeen?: string;

  constructor(private readonly options: ClientOptions) {
    this.base = options.url.replace(/\/$/, "");
    this.current = derive(this.facts);
    if (options.onConflict) this.conflictHandlers.add(options.onConflict);
    if (options.onRejected) this.rejectedHandlers.add(options.onRejected);
    this.ready = this.start();
  }

  /** The entity `code`, held in this tab's memory from now on and kept in sync. */
  entity(code: string, options: EntityOptions = {}): Entity {
    let entity = this.entities.get(code);
    if (entity) {
      Object.assign(entity.options, options);
      return entity;
    }
    this.entities.set(code, (entity = new Entity(this, code, options)));
    void this.ready.then(() => this.open(entity)).catch(() => undefined);
    return entity;
  }

  /** `connecting`, `live` or `offline` (see `syncStatus` for the details). */
  get status(): Status {
    return this.current.status;
  }

  /** Where the sync stands, as the leading tab knows it (the same in every tab). */
  get syncStatus(): SyncStatus {
    return this.current;
  }

  /** Writes made on this device that the server has not applied yet. */
  get pendingWrites(): number {
    return this.replica.pendingMutations().filter((m) => !m.cursor).length;
  }

  /** Calls `listener` whenever the status changes; returns the unsubscribe. */
  onStatus(listener: (status: Status, detail: SyncStatus) => void): () => void {
    this.statusListeners.add(listener);
    return () => this.statusListeners.delete(listener);
  }

  /** Handles refused writes (409) from now on, including ones refused while no tab could be
   * told (see the README's "Conflicts"); returns the unsubscribe. */
  onConflict(handler: (conflict: Refusal) => void): () => void {
    this.conflictHandlers.add(handler);
    void this.ready.then(() => this.claimRefusals()).catch(() => undefined);
    return () => this.conflictHandlers.delete(handler);
  }

  /** Handles writes refused by row-level security, privileges or as malformed (403, 400). */
  onRejected(handler: (rejection: Refusal) => void): () => void {
    this.rejectedHandlers.add(handler);
    void this.ready.then(() => this.claimRefusals()).catch(() => undefined);
    return () => this.rejectedHandlers.delete(handler);
  }

  /** Resolves once every entity this tab opened holds a whole sync: its rows were fetched at
   * least once (now or in an earlier session) and are in this tab's memory. Rejects when the
   * client closes first. An entity the user may not read counts as done (`syncStatus`). */
  async waitForFirstSync(): Promise<void> {
    await this.ready;
    return new Promise((resolve, reject) => {
      const check = () => {
        if (this.closed) reject(new Error("pg-sync: the client is closed"));
        else if (![...this.entities.keys()].every((e) => this.firstSynced(e))) return;
        else resolve();
        this.waiters.delete(check);
      };
      this.waiters.add(check);
      check();
    });
  }

  /** Stops this tab's client: its socket (when leading), its channel and its database connection. */
  close(): void {
    this.shutdown();
  }

  /** Forgets everything this user's client stored on this device (at sign-out): the rows,
   * the cursors, the outbox. Every tab of the user closes its client, so the database is
   * deleted when this resolves. */
  async clearLocalData(): Promise<void> {
    await this.ready.catch(() => undefined);
    this.tell({ t: "signout" });
    this.shutdown();
    if (this.name) {
      (globalThis.localStorage as Storage | undefined)?.removeItem(`${this.name}:client`);
      await deleteDB(this.name);
    }
  }

  private async start(): Promise<void> {
    this.token = await this.freshToken();
    // The local copy is the user's: one database per user, and no user, no database.
    const sub = claims(this.token).sub;
    if (!sub) throw new Error("pg-sync: the token has no sub (user id)");
    this.sub = sub;
    const name = (this.name = `pg-sync:${sub}@${this.base}`);
    this.store = await Store.open(
      name,
      (e) => this.error(e),
      (deleted) => (deleted ? this.shutdown() : this.error(new Error("pg-sync: a newer version opened the database in another tab"))),
    );
    this.replica.setPending((await this.store.outbox()) ?? []);
    const storage = globalThis.localStorage as Storage | undefined;
    this.txs.marks = storage?.getItem(`${this.base}:txEnd`) === "1";
    this.clientId = this.options.clientId ?? storage?.getItem(`${name}:client`) ?? crypto.randomUUID();
    storage?.setItem(`${name}:client`, this.clientId);
    if (typeof BroadcastChannel !== "undefined") {
      this.channel = new BroadcastChannel(name);
      this.channel.onmessage = (event: MessageEvent<Note>) => void this.hear(event.data);
    }
    this.facts.online = globalThis.navigator?.onLine !== false;
    globalThis.addEventListener?.("online", () => this.onlineChanged(true));
    globalThis.addEventListener?.("offline", () => this.onlineChanged(false));
    globalThis.addEventListener?.("visibilitychange", () => {
      if (document.visibilityState === "visible") this.ping(); // a slept socket shows itself
    });
    const locks = globalThis.navigator?.locks;
    if (locks) {
      // Held while this tab lives: a refusal for a write of a closed tab goes to another.
      void locks.request(`${name}:tab:${this.tab}`, () => new Promise<void>((r) => this.releases.push(r)));
      void locks.request(`${name}:leader`, () => this.lead());
    } else {
      void this.lead();
    }
    this.tell({ t: "hello" });
    void this.claimRefusals();
  }

  private open(entity: Entity): void {
    if (this.closed) return;
    this.loadSoon(entity.code);
    if (this.leading) this.follow(entity.code, entity.options);
    else this.tell({ t: "need", entity: entity.code, options: entity.options });
  }

  private firstSynced(entity: string): boolean {
    return (this.loads.get(entity) === "loaded" && this.syncedHere.has(entity)) || !!this.current.entities[entity]?.error;
  }

  private checkWaiters(): void {
    this.waiters.forEach((check) => check());
  }

  // ---- commits: memory, other tabs, storage ------------------------------------------

  /** Loads entities into this tab's memory (those opened together, together: one state):
   * the stored rows, then the commits not stored yet. */
  private async load(codes: string[]): Promise<void> {
    codes.forEach((code) => this.loads.set(code, "loading"));
    this.loading++;
    try {
      const stored = await this.store.entities(codes);
      if (this.closed) return;
      const loaded: [string, Map<string, Row>, boolean][] = [];
      const again: string[] = [];
      for (const code of codes) {
        // Without storage, memory is all there is: the commits this tab heard.
        const rows = stored?.rows.get(code) ?? new Map<string, Row>();
        let synced = !!stored?.meta.get(code);
        let stale: number | undefined;
        for (const commit of this.recent) {
          if (commit.seq <= (stored?.seq ?? 0)) continue;
          for (const item of commit.items) {
            if (item.entity !== code) continue;
            if (item.replaced && stored) stale = commit.seq;
            if (stale !== undefined) continue;
            if (item.drop) rows.clear();
            for (const [id, row] of item.changes ?? []) {
              if (row) rows.set(id, row);
              else rows.delete(id);
            }
            if (item.meta !== undefined) synced = !!item.meta;
          }
        }
        if (stale === undefined) loaded.push([code, rows, synced]);
        else if (stale > this.storedSeq) this.loads.set(code, stale); // a new snapshot: loaded once it is stored
        else again.push(code);
      }
      for (const [code, rows, synced] of loaded) {
        this.replica.load(code, rows);
        this.loads.set(code, "loaded");
        if (synced) this.syncedHere.add(code);
        else this.syncedHere.delete(code);
      }
      if (again.length) void this.load(again);
      this.checkWaiters();
    } finally {
      this.loading--;
      this.prune();
      if (!this.loading) this.whenLoaded.splice(0).forEach((resolve) => resolve());
    }
  }

  /** Resolves when no load from IndexedDB is under way in this tab. */
  private loaded(): Promise<void> {
    return this.loading || this.toLoad.size ? new Promise((resolve) => this.whenLoaded.push(resolve)) : Promise.resolve();
  }

  /** Loads `code` with the others opened in the same task. */
  private loadSoon(code: string): void {
    this.toLoad.add(code);
    if (this.toLoad.size > 1) return;
    queueMicrotask(() => {
      const codes = [...this.toLoad];
      this.toLoad.clear();
      void this.load(codes);
    });
  }

  /** A commit into this tab's memory (`swapped`: entities whose new snapshot the leader
   * already put there). */
  private applyCommit(commit: Commit, swapped?: Set<string>): void {
    if (commit.seq <= this.applied) return;
    this.applied = commit.seq;
    this.recent.push(commit);
    for (const item of commit.items) {
      if (item.meta !== undefined && !this.leading) {
        if (item.meta) this.meta.set(item.entity, item.meta);
        else this.meta.delete(item.entity);
      }
      if (this.loads.get(item.entity) !== "loaded") continue;
      if (item.replaced && !swapped?.has(item.entity)) {
        this.loads.set(item.entity, commit.seq); // stale until stored, then loaded again
        continue;
      }
      if (item.replaced) this.syncedHere.add(item.entity);
      if (item.drop) this.replica.drop(item.entity);
      for (const [id, row] of item.changes ?? []) this.replica.put(item.entity, id, row);
      if (item.meta) this.syncedHere.add(item.entity);
      else if (item.meta === null) this.syncedHere.delete(item.entity);
    }
    this.checkWaiters();
  }

  /** Commits up to `seq` are stored: loads no longer need them, stale entities load again. */
  private storedUpTo(seq: number): void {
    this.storedSeq = Math.max(this.storedSeq, seq);
    this.prune();
    for (const [entity, state] of this.loads) {
      if (typeof state === "number" && state <= this.storedSeq) this.loadSoon(entity);
    }
    this.reloadUnsynced();
  }

  /** An entity loaded before its first snapshot was stored (this tab opened it while the
   * leader was storing it) loads again once the leader says it has synced, as stores follow. */
  private reloadUnsynced(): void {
    for (const [entity, state] of this.loads) {
      if (state === "loaded" && !this.syncedHere.has(entity) && this.current.entities[entity]?.hasSynced) this.loadSoon(entity);
    }
  }

  private prune(): void {
    if (!this.loading) this.recent = this.recent.filter((c) => c.seq > this.storedSeq);
  }

  /** The leader's commit: into memory, to the other tabs, into storage behind. */
  private commit(items: Item[], swapped?: Set<string>): void {
    if (!items.length || this.closed) return;
    const commit: Commit = { seq: ++this.seq, items };
    for (const item of items) {
      if (item.meta) this.meta.set(item.entity, item.meta);
      else if (item.meta === null) this.meta.delete(item.entity);
    }
    this.applyCommit(commit, swapped);
    this.tell({ t: "commit", commit });
    this.persist(commit);
    this.refreshStatus();
  }

  /** Queues a commit for the store, merged with the commits not written yet: one write runs
   * at a time and takes everything queued meanwhile, so a burst of commits costs a few
   * IndexedDB transactions, not one each, and the store is always a whole commit's state. */
  private persist(commit: Commit): void {
    let batch = this.unwritten;
    if (!batch) {
      const fresh = (batch = this.unwritten = { seq: 0, entities: new Map<string, EntityWrite>() });
      this.chain(async () => {
        if (this.unwritten === fresh) this.unwritten = undefined;
        await this.store.write(fresh.entities, fresh.seq);
        this.wrote(fresh.seq);
      });
    }
    batch.seq = commit.seq;
    merge(batch.entities, commit.items);
  }

  private chain(step: () => Promise<void>): void {
    this.writing = this.writing.then(step).catch((e: unknown) => this.error(e));
  }

  /** Commits from now on are written after the steps chained so far. */
  private seal(): void {
    this.unwritten = undefined;
  }

  private wrote(seq: number): void {
    if (this.closed) return;
    this.storedUpTo(seq);
    this.tell({ t: "stored", seq });
  }

  // ---- tabs ---------------------------------------------------------------------------

  /** Holds the lead until the tab goes: the socket, the snapshots, the store, the outbox drain. */
  private async lead(): Promise<void> {
    if (this.closed) return;
    this.leading = true;
    const held = new Promise<void>((resolve) => this.releases.push(resolve));
    // What the last leader told the tabs but did not store, stored now (but never a new
    // snapshot's position, or anything after it, whose rows may not all be stored).
    const before = await this.store.state();
    const missing = new Map<string, EntityWrite>();
    const partial = new Set<string>();
    for (const commit of this.recent) {
      if (commit.seq <= before.seq) continue;
      for (const item of commit.items) if (item.replaced) partial.add(item.entity);
      merge(missing, commit.items.filter((item) => !partial.has(item.entity)));
    }
    this.seq = Math.max(before.seq, this.applied);
    if (missing.size) await this.store.write(missing, this.seq);
    const state = await this.store.state();
    if (this.closed) return held;
    state.meta.forEach((meta, entity) => {
      this.meta.set(entity, meta);
      this.followed.set(entity, { key: meta.key, mode: meta.mode });
    });
    this.storedUpTo(this.seq);
    this.tell({ t: "stored", seq: this.seq });
    this.accessSeen = state.claims;
    this.checkAccess();
    for (const entity of this.entities.values()) this.follow(entity.code, entity.options);
    this.tell({ t: "lead" });
    this.refreshStatus();
    void this.connect();
    void this.drain();
    return held;
  }

  private async hear(note: Note): Promise<void> {
    if (this.closed) return;
    switch (note.t) {
      case "commit":
        return this.applyCommit(note.commit);
      case "stored":
        return this.storedUpTo(note.seq);
      case "status":
        if (!this.leading) this.publish({ ...note.status, pendingWrites: this.pendingWrites });
        return this.reloadUnsynced();
      case "hello":
        if (this.leading) this.tell({ t: "status", status: this.current });
        return;
      case "lead":
        for (const entity of this.entities.values()) this.tell({ t: "need", entity: entity.code, options: entity.options });
        return;
      case "outbox": {
        const outbox = await this.store.outbox();
        if (outbox) this.replica.setPending(outbox);
        this.refreshStatus();
        if (this.leading) void this.drain();
        return;
      }
      case "refused":
        return this.claimRefusals();
      case "need":
        if (this.leading) this.follow(note.entity, note.options);
        return;
      case "signout":
        return this.shutdown();
    }
  }

  private tell(note: Note): void {
    try {
      this.channel?.postMessage(note);
    } catch {
      // closed
    }
  }

  private shutdown(): void {
    if (this.closed) return;
    this.closed = true;
    this.leading = false;
    this.releases.forEach((release) => release());
    this.socket?.close(1000);
    this.channel?.close();
    this.channel = undefined;
    this.store?.close();
    this.wake.abort();
    this.timers.forEach(clearTimeout);
    clearTimeout(this.txTimer);
    this.facts.closed = true;
    this.publish({ ...this.current, status: "offline", connected: false, closed: true });
    this.checkWaiters();
  }

  // ---- status -------------------------------------------------------------------------

  private refreshStatus(): void {
    if (!this.leading) {
      if (this.current.pendingWrites !== this.pendingWrites) this.publish({ ...this.current, pendingWrites: this.pendingWrites });
      return;
    }
    const entities: Record<string, EntityStatus> = {};
    for (const code of this.followed.keys()) {
      const error = this.forbidden.has(code) ? "forbidden" : undefined;
      entities[code] = {
        hasSynced: this.meta.has(code),
        live: this.liveHere.has(code),
        downloading: !error && !!this.socket && (this.hydrating.has(code) || this.subscribing.has(code) || (this.subscribed.has(code) && !this.liveHere.has(code))),
        ...(error ? { error } : {}),
      };
    }
    this.facts.entities = entities;
    this.facts.pendingWrites = this.pendingWrites;
    this.publish(derive(this.facts));
  }

  private publish(status: SyncStatus): void {
    if (sameStatus(status, this.current)) return;
    this.current = status;
    if (this.leading) this.tell({ t: "status", status });
    this.statusListeners.forEach((l) => l(status.status, status));
    this.checkWaiters();
  }

  private onlineChanged(online: boolean): void {
    this.facts.online = online;
    if (online) {
      this.nudge();
    } else if (this.socket?.readyState === WebSocket.OPEN) {
      // The socket may live on (or be dead without knowing it): ask it.
      const asked = Date.now();
      this.ping();
      this.later(() => {
        if (this.lastPong < asked) this.socket?.close(4000, "no pong");
      }, PROBE_MS);
    }
    this.refreshStatus();
  }

  private error(error: unknown): void {
    const message = error instanceof Error ? error.message : String(error);
    this.facts.lastError = { message, at: Date.now() };
    if (this.leading) this.refreshStatus();
    else this.publish({ ...this.current, lastError: this.facts.lastError });
    this.options.onError?.(error);
  }

  private later(work: () => void, ms: number): void {
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      if (!this.closed) work();
    }, ms);
    this.timers.add(timer);
  }

  private backoff(attempt: number, floorMs?: number): number {
    return retryDelay(attempt, floorMs, this.options.retry?.baseMs, this.options.retry?.capMs);
  }

  private nudge(): void {
    this.wake.abort();
    this.wake = new AbortController();
  }

  private async freshToken(): Promise<string> {
    const exp = claims(this.token).exp;
    if (this.options.getToken && (!this.token || (exp && exp * 1000 - Date.now() < 60000))) {
      const token = await this.options.getToken();
      if (this.sub && claims(token).sub !== this.sub) {
        // Another user: this user's rows and writes must not travel under their token.
        this.shutdown();
        throw new Error("pg-sync: the token is for another user; make a new client for them");
      }
      this.token = token;
      if (this.leading) this.checkAccess();
    }
    return this.token || this.options.token || "";
  }

  /** Rows fetched under other claims (another role, other claims the policies read) may not
   * be the user's to see now: forget them all and fetch again. */
  private checkAccess(): void {
    const now = access(this.token || this.options.token || "");
    if (now === this.accessSeen) return;
    const before = this.accessSeen;
    this.accessSeen = now;
    if (before !== undefined) {
      const entities = new Set([...this.meta.keys(), ...this.followed.keys()]);
      this.forbidden.clear();
      this.commit([...entities].map((entity) => ({ entity, drop: true, meta: null })));
      this.socket?.close(4000, "the token's claims changed");
    }
    this.chain(() => this.store.write(new Map(), undefined, now));
  }

  // ---- writes -------------------------------------------------------------------------

  async write(entityCode: string, action: Action, entityId: string, data?: Row, expect?: Row): Promise<string> {
    await this.ready;
    if (this.closed) throw new Error("pg-sync: the client is closed");
    const mutation: Mutation = { id: crypto.randomUUID(), entityCode, action, entityId, data, expect, tab: this.tab };
    mutation.seq = (await this.store.enqueue(mutation)) ?? Date.now() * 1000 + this.replica.pendingMutations().length;
    this.replica.setPending([...this.replica.pendingMutations(), mutation]);
    this.tell({ t: "outbox" });
    this.refreshStatus();
    if (this.leading) void this.drain();
    return mutation.id;
  }

  /** Sends the outbox in order, in batches, until it is empty (leader only). */
  private async drain(): Promise<void> {
    if (this.draining || !this.leading) return;
    this.draining = true;
    try {
      for (let attempt = 0; !this.closed && this.leading; ) {
        const batch = this.replica.pendingMutations().filter((m) => !m.cursor).slice(0, BATCH);
        this.facts.uploading = batch.length > 0;
        this.refreshStatus();
        if (batch.length === 0) return;
        const outcome = await send(batch, this.clientId, async (body) =>
          fetch(`${this.base}/v1/write`, {
            method: "POST",
            headers: { "content-type": "application/json", authorization: `Bearer ${await this.freshToken()}` },
            body,
          }),
        );
        if (outcome.kind === "applied") {
          attempt = 0;
          await this.applied_(batch, outcome.cursor);
        } else if (outcome.kind === "refused") {
          attempt = 0;
          const mutation = batch.find((m) => m.id === outcome.id)!;
          await this.refuse({ mutation, status: outcome.status, error: outcome.error, current: outcome.current });
        } else if (outcome.kind === "unauthorized" && this.options.getToken && attempt === 0) {
          attempt++;
          this.token = "";
        } else {
          if (outcome.kind === "retry") this.error(new Error(`writes: ${outcome.afterMs === undefined ? "no answer" : "busy"}; retrying`));
          await sleep(this.backoff(attempt++, outcome.kind === "retry" ? outcome.afterMs : undefined), this.wake.signal);
        }
      }
    } finally {
      this.draining = false;
      this.facts.uploading = false;
      this.refreshStatus();
    }
  }

  /** The server applied `batch`: each write's optimistic state stays until the stream has
   * brought its change back (REACHED for its cursor, or a message past it). */
  private async applied_(batch: Mutation[], cursor: string): Promise<void> {
    const settled: Mutation[] = [];
    for (const m of batch) {
      m.cursor = cursor;
      const position = this.meta.get(m.entityCode)?.cursor;
      if (position && reaches(position, cursor)) settled.push(m);
      else await this.store.updateMutation(m);
    }
    await this.settle(settled);
    this.replica.setPending([...this.replica.pendingMutations()]);
    this.tell({ t: "outbox" });
    this.refreshStatus();
    this.awaitCursor(cursor);
  }

  /** Ends mutations whose change the stream has brought back: out of the outbox and the overlay. */
  private async settle(done: Mutation[]): Promise<void> {
    if (!done.length) return;
    const ids = new Set(done.map((m) => m.id));
    this.replica.setPending(this.replica.pendingMutations().filter((p) => !ids.has(p.id)));
    await this.store.removeMutations(done.map((m) => m.seq));
    this.tell({ t: "outbox" });
  }

  /** A write refused for good: rolled back, and kept until a tab with a handler is told. */
  private async refuse(refusal: StoredRefusal): Promise<void> {
    if (this.store.working) await this.store.refuse(refusal);
    else this.unstoredRefusals.push(refusal);
    this.replica.setPending(this.replica.pendingMutations().filter((p) => p.id !== refusal.mutation.id));
    this.tell({ t: "outbox" });
    this.tell({ t: "refused" });
    await this.claimRefusals();
  }

  /** Tells this tab's handlers of refusals no other open tab should hear of: its own, and those
   * of tabs that closed. Each refusal is taken by one tab (an IndexedDB transaction decides). */
  private async claimRefusals(): Promise<void> {
    if (!this.store || (!this.conflictHandlers.size && !this.rejectedHandlers.size)) return;
    const refusals = [...this.unstoredRefusals.splice(0), ...(await this.store.refusals())];
    if (!refusals.length) return;
    const locks = globalThis.navigator?.locks;
    const prefix = `${this.name}:tab:`;
    const open = locks
      ? new Set(((await locks.query()).held ?? []).map((l) => l.name ?? "").filter((n) => n.startsWith(prefix)).map((n) => n.slice(prefix.length)))
      : undefined;
    for (const { key, ...refusal } of refusals) {
      const handlers = refusal.status === 409 ? this.conflictHandlers : this.rejectedHandlers;
      if (!handlers.size || (refusal.mutation.tab !== this.tab && open?.has(refusal.mutation.tab))) {
        if (key === undefined) this.unstoredRefusals.push(refusal);
        continue;
      }
      if (key !== undefined && !(await this.store.claimRefusal(key))) continue;
      handlers.forEach((handle) => handle(refusal));
    }
  }

  /** AWAIT for a write's cursor, once every entity is live (until then REACHED would not cover
   * an entity still being fetched or replayed: its rows are not on show yet). */
  private awaitCursor(cursor: string): void {
    if (this.awaitUnsupported || this.catchingUp() || this.socket?.readyState !== WebSocket.OPEN) return;
    this.socket.send(JSON.stringify({ type: "AWAIT", payload: { cursor, ref: `await:${++this.awaits}` } }));
  }

  /** REACHED: every change up to `cursor` has been delivered, so the writes it covers are settled. */
  private async reached(cursor: string): Promise<void> {
    if (this.catchingUp()) return; // asked again once caught up
    await this.settle(this.replica.pendingMutations().filter((m) => m.cursor && (m.cursor === cursor || reaches(cursor, m.cursor))));
    this.refreshStatus();
  }

  // ---- the stream (leader only) -------------------------------------------------------

  /** The socket serves `code` (for this tab or another). */
  private follow(code: string, options: EntityOptions): void {
    this.followed.set(code, { ...this.followed.get(code), ...options });
    this.refreshStatus();
    const socket = this.socket;
    if (socket?.readyState === WebSocket.OPEN) this.enqueue(() => this.begin(code, socket));
  }

  private async connect(): Promise<void> {
    for (let attempt = 0; !this.closed && this.leading; ) {
      this.facts.socket = "opening";
      this.refreshStatus();
      const outcome = await this.session().catch((e: unknown) => (this.error(e), { opened: false, live: false }));
      this.socket = undefined;
      if (this.closed || !this.leading) return;
      const after = this.reconnectAfter;
      this.reconnectAfter = undefined;
      this.facts.socket = "down";
      this.facts.failed = after === undefined && !outcome.opened;
      this.refreshStatus();
      if (after !== undefined) {
        // The server asked (it is stopping, or its standby is behind): no sooner than it said.
        attempt = 0;
        await sleep(after + fullJitter(0, this.options.retry?.baseMs, this.options.retry?.capMs));
      } else {
        attempt = outcome.live ? 0 : attempt + 1;
        await sleep(this.backoff(attempt), this.wake.signal);
      }
    }
  }

  /** One socket, until it closes. */
  private async session(): Promise<{ opened: boolean; live: boolean }> {
    const token = await this.freshToken();
    // Its own origin tag, so that this profile's writes come back on the stream.
    const url = `${this.base.replace(/^http/, "ws")}/ws/sync?token=${encodeURIComponent(token)}&clientId=${crypto.randomUUID()}`;
    const socket = new WebSocket(url);
    this.socket = socket;
    let opened = false;
    let live = false;
    const timers: ReturnType<typeof setTimeout>[] = [];
    await new Promise<void>((resolve) => {
      socket.onopen = () => {
        opened = true;
        this.lastPong = Date.now();
        this.facts.socket = "open";
        this.facts.failed = false;
        this.enqueue(async () => {
          // The last socket's unfinished transactions: replayed from the cursors.
          this.txs.take();
          this.caughtUp = [];
          this.subscribing.clear();
          this.subscribed.clear();
          this.liveHere.clear();
          for (const code of this.followed.keys()) await this.begin(code, socket);
        });
        this.refreshStatus();
        timers.push(
          setInterval(() => {
            if (Date.now() - this.lastPong > 2 * PING_EVERY_MS + 5000) socket.close(4000, "no pong");
            else this.ping();
          }, PING_EVERY_MS),
        );
        this.scheduleAuth(socket, token);
        void this.drain();
      };
      socket.onmessage = (event: MessageEvent<string>) => {
        const message = JSON.parse(event.data) as { type: string; payload?: Record<string, unknown> };
        if (message.type === "PONG") this.lastPong = Date.now();
        else if (message.type === "RECONNECT") this.reconnectAfter = Math.max(0, Number(message.payload?.afterMs) || 0);
        else {
          if (message.type === "SYNCED") live = true;
          this.enqueue(() => this.handle(message.type, message.payload ?? {}, socket));
        }
      };
      socket.onclose = () => resolve();
    });
    timers.forEach(clearInterval);
    clearTimeout(this.txTimer);
    clearTimeout(this.authTimer);
    return { opened, live };
  }

  private enqueue(work: () => Promise<void>): void {
    this.queue = this.queue.then(work).catch((e: unknown) => this.error(e));
  }

  private ping(): void {
    if (this.socket?.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify({ type: "PING" }));
  }

  /** Sends a new token (AUTH) a minute before this one expires. */
  private scheduleAuth(socket: WebSocket, token: string): void {
    const exp = claims(token).exp;
    if (!this.options.getToken || !exp) return;
    this.authTimer = setTimeout(() => void this.reauthenticate(socket), Math.max(5000, exp * 1000 - Date.now() - 60000));
  }

  private async reauthenticate(socket: WebSocket): Promise<void> {
    this.token = "";
    const token = await this.freshToken().catch((e: unknown) => (this.error(e), undefined));
    if (!token || socket.readyState !== WebSocket.OPEN) return;
    socket.send(JSON.stringify({ type: "AUTH", payload: { token } }));
    this.scheduleAuth(socket, token);
  }

  /** Fetches the entity if it has no position (or must be fetched again), then subscribes from its position. */
  private async begin(code: string, socket: WebSocket): Promise<void> {
    const busy = this.subscribing.has(code) || this.subscribed.has(code) || this.hydrating.has(code);
    if (socket !== this.socket || socket.readyState !== WebSocket.OPEN || busy || this.forbidden.has(code)) return;
    const since = this.meta.get(code)?.cursor;
    if (!since || this.fresh.has(code)) {
      try {
        // Subscribed from the snapshot's cursor as soon as it is read, while the rows come.
        await this.hydrate(code, (cursor) => this.subscribe(code, cursor, socket));
      } catch (e) {
        if (this.subscribing.delete(code) && socket.readyState === WebSocket.OPEN) {
          socket.send(JSON.stringify({ type: "UNSUBSCRIBE", payload: { entityCode: code } }));
        }
        this.error(e);
        if (e instanceof HttpError && e.status === 403) return this.forbid(code);
        if (e instanceof HttpError && e.status === 401) this.token = "";
        const attempt = this.attempts.get(code) ?? 0;
        this.attempts.set(code, attempt + 1);
        const wait = this.backoff(attempt, e instanceof HttpError ? e.retryAfter : undefined);
        this.later(() => this.enqueue(() => this.begin(code, socket)), wait);
      }
      return;
    }
    this.subscribe(code, since, socket);
  }

  private subscribe(code: string, since: string, socket: WebSocket): void {
    if (socket !== this.socket || socket.readyState !== WebSocket.OPEN) return;
    this.subscribing.add(code);
    const mode = this.followed.get(code)?.mode ?? "delta";
    socket.send(JSON.stringify({ type: "SUBSCRIBE", payload: { entityCode: code, mode, since, ref: code } }));
    this.refreshStatus();
  }

  private async fetchSnapshot(code: string, ids?: string[]): Promise<Response> {
    const query = ids ? `?ids=${ids.map(encodeURIComponent).join(",")}` : "";
    const response = await fetch(`${this.base}/v1/snapshot/${encodeURIComponent(code)}${query}`, {
      headers: { authorization: `Bearer ${await this.freshToken()}` },
    });
    if (!response.ok || !response.body) {
      throw new HttpError(response.status, `snapshot of ${code}`, retryAfterMs(response.headers.get("Retry-After")));
    }
    return response;
  }

  /** Fetches the entity's snapshot and stores its rows (in a worker when one can start);
   * returns its cursor. The snapshot is shown with the catch-up that follows it (`release`). */
  private async hydrate(code: string, onCursor: (cursor: string) => void): Promise<string> {
    const options = this.followed.get(code) ?? {};
    this.hydrating.add(code);
    this.refreshStatus();
    try {
      const response = await this.fetchSnapshot(code);
      const keep = this.loads.has(code); // this tab shows it
      const rows = new Map<string, Row>();
      this.seal(); // what was committed before is written before the snapshot
      const worker = this.store.working && this.options.worker !== false && typeof Worker !== "undefined";
      const chunks: Uint8Array[] = [];
      const parsed: Row[] = [];
      const cursor = await readSnapshot(response.body!, {
        rows:
          keep || !worker
            ? (batch) => {
                if (keep) for (const row of batch) rows.set(idOf(row, options.key), row);
                if (!worker) for (const row of batch) parsed.push(row);
              }
            : undefined,
        bytes: worker ? (chunk) => chunks.push(chunk) : undefined,
        cursor: onCursor,
      });
      // Stored after the read (storing while reading slows it), before what is committed next.
      this.chain(() => this.storeSnapshot(code, options.key ?? "id", worker ? chunks : undefined, parsed));
      // What was held of this entity is older than the snapshot.
      this.caughtUp = this.caughtUp.filter((p) => p.entity !== code);
      this.caughtUp.push({ entity: code, changes: [], cursor, snapshot: { rows: keep ? rows : undefined } });
      return cursor;
    } finally {
      this.hydrating.delete(code);
      this.refreshStatus();
    }
  }

  /** Replaces an entity's stored rows by a snapshot's (its bytes for a worker, else its rows),
   * without its position: that comes with the commit that shows the snapshot. */
  private async storeSnapshot(code: string, key: string | string[], chunks: Uint8Array[] | undefined, rows: Row[]): Promise<void> {
    const stored = chunks && storeInWorker(this.name, code, key, chunks);
    if (stored) return stored.catch((e: unknown) => this.store.abandon(e)); // memory only from here
    if (chunks) rows = rowsOf(chunks);
    const writes: Promise<void>[] = [];
    for (let i = 0; i === 0 || i < rows.length; i += PAGE_BATCH) {
      const page = new Map<string, Row | null>(rows.slice(i, i + PAGE_BATCH).map((row) => [idOf(row, key), row]));
      writes.push(this.store.write(new Map([[code, { drop: i === 0, rows: page, meta: i === 0 ? null : undefined }]])));
      await yieldToPage();
    }
    await Promise.all(writes);
  }

  private async handle(type: string, payload: Record<string, unknown>, socket: WebSocket): Promise<void> {
    if (socket !== this.socket || this.closed) return;
    const code = payload.entityCode as string | undefined;
    const cursor = payload.cursor as string;
    switch (type) {
      case "SUBSCRIBED":
        if (!code || payload.ref !== code || !this.subscribing.delete(code)) return;
        this.subscribed.add(code);
        return this.refreshStatus();
      case "DELTA":
      case "INVALIDATE": {
        if (!code || !this.subscribed.has(code)) return; // not ours, or an earlier subscription's
        const changes = payload.changes as Change[];
        const version = changes.find((c) => c.schemaVersion !== undefined)?.schemaVersion;
        const known = this.meta.get(code)?.schemaVersion;
        if (version !== undefined && known !== undefined && version !== known) {
          await this.release(this.txs.take());
          return this.resync(code, socket);
        }
        const piece: Piece = { entity: code, changes, cursor, invalidate: type === "INVALIDATE" };
        const marked = this.txs.marks;
        const released = this.txs.add(piece, payload.txEnd === true, Date.now());
        // Remembered, so that the next connection waits for txEnd from its first message.
        if (!marked && this.txs.marks) (globalThis.localStorage as Storage | undefined)?.setItem(`${this.base}:txEnd`, "1");
        return this.release(released);
      }
      case "SYNCED":
        if (!code || !this.subscribed.has(code)) return;
        this.liveHere.add(code);
        await this.release(this.txs.synced({ entity: code, changes: [], cursor }, Date.now()));
        // Caught up: REACHED now covers every entity, for the writes applied meanwhile.
        if (!this.catchingUp()) new Set(this.replica.pendingMutations().map((m) => m.cursor)).forEach((c) => c && this.awaitCursor(c));
        return this.refreshStatus();
      case "REACHED":
        await this.release(this.txs.barrier());
        return this.reached(cursor);
      case "RESYNC":
        if (!code || !this.followed.has(code)) return;
        await this.release(this.txs.take());
        return this.resync(code, socket);
      case "ERROR":
        return this.failure(payload, socket);
    }
  }

  /** Whether some entity of this socket is not live yet (being fetched, replaying, about to
   * be subscribed): each entity's replay runs on its own, so until all are live, a
   * transaction may have arrived in part. Entities whose fetch keeps failing are not waited for. */
  private catchingUp(): boolean {
    return [...this.followed.keys()].some((code) => !this.liveHere.has(code) && !this.forbidden.has(code) && !this.attempts.has(code));
  }

  /** Applies whole transactions released by `txs` as one commit, or holds them while the
   * socket catches up (then the whole catch-up is one commit); arms the timer for `txs`. */
  private async release(released: Piece[] | undefined): Promise<void> {
    clearTimeout(this.txTimer);
    if (released) this.caughtUp.push(...released);
    const held = this.caughtUp.reduce((n, p) => n + p.changes.length, 0);
    if (this.caughtUp.length && (!this.catchingUp() || held >= MAX_CHANGES)) {
      // This tab's entities are in memory first, so that the commit shows on all of them.
      await this.loaded();
      const pieces = this.caughtUp;
      this.caughtUp = [];
      const items: Item[] = [];
      const positions = new Map<string, Meta>();
      const swapped = new Set<string>();
      for (const piece of pieces) {
        const before = positions.get(piece.entity) ?? this.meta.get(piece.entity);
        if (piece.snapshot) {
          const options = this.followed.get(piece.entity) ?? {};
          const meta: Meta = { cursor: piece.cursor, key: options.key, mode: options.mode };
          positions.set(piece.entity, meta);
          items.push({ entity: piece.entity, replaced: true, meta });
          if (piece.snapshot.rows && this.loads.has(piece.entity)) {
            this.replica.load(piece.entity, piece.snapshot.rows);
            this.loads.set(piece.entity, "loaded");
            swapped.add(piece.entity);
          }
          this.fresh.delete(piece.entity);
          this.attempts.delete(piece.entity);
          continue;
        }
        const version = piece.changes.find((c) => c.schemaVersion !== undefined)?.schemaVersion;
        const meta: Meta = { ...before, cursor: piece.cursor, schemaVersion: version ?? before?.schemaVersion };
        positions.set(piece.entity, meta);
        let changes: RowChange[];
        if (piece.invalidate) {
          const ids = [...new Set(piece.changes.map((c) => c.entityId))];
          const fetched = await this.fetchRows(piece.entity, ids);
          changes = ids.map((id) => [id, fetched.get(id) ?? null]);
        } else {
          changes = piece.changes.map((c) => [c.entityId, c.action === "DELETE" ? null : (c.data ?? {})]);
        }
        items.push({ entity: piece.entity, changes, meta });
      }
      this.commit(items, swapped);
      // Writes whose cursor the stream has passed are settled.
      const settled = this.replica
        .pendingMutations()
        .filter((m) => m.cursor && positions.has(m.entityCode) && reaches(positions.get(m.entityCode)!.cursor, m.cursor));
      await this.settle(settled);
    }
    const wait = this.txs.deadline(Date.now());
    if (wait !== undefined) {
      this.txTimer = setTimeout(() => this.enqueue(() => this.release(this.txs.expire(Date.now()))), wait);
    }
  }

  /** INVALIDATE: the named rows as they are now. */
  private async fetchRows(code: string, ids: string[]): Promise<Map<string, Row>> {
    const key = this.followed.get(code)?.key;
    const rows = new Map<string, Row>();
    try {
      await readSnapshot((await this.fetchSnapshot(code, ids)).body!, {
        rows: (parsed) => parsed.forEach((row) => rows.set(idOf(row, key), row)),
      });
    } catch (e) {
      this.socket?.close(4000, "a fetch failed"); // resume from the stored cursors
      throw e;
    }
    return rows;
  }

  /** Keeps the entity's rows on show and fetches it again; the outbox stays. */
  private async resync(code: string, socket: WebSocket): Promise<void> {
    if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "UNSUBSCRIBE", payload: { entityCode: code } }));
    this.subscribed.delete(code);
    this.subscribing.delete(code);
    this.liveHere.delete(code);
    this.fresh.add(code);
    await this.begin(code, socket);
  }

  /** The user may no longer read the entity: its rows and position go, and it is not followed. */
  private forbid(code: string): void {
    this.txs.drop(code);
    this.caughtUp = this.caughtUp.filter((p) => p.entity !== code);
    this.subscribed.delete(code);
    this.subscribing.delete(code);
    this.liveHere.delete(code);
    this.forbidden.add(code);
    this.commit([{ entity: code, drop: true, meta: null }]);
    this.refreshStatus();
  }

  private async failure(payload: Record<string, unknown>, socket: WebSocket): Promise<void> {
    const code = payload.code as string;
    const ref = payload.ref as string | undefined;
    const entity = (payload.entityCode as string | undefined) ?? (ref && this.followed.has(ref) ? ref : undefined);
    this.error(new Error(`${code}: ${String(payload.message)}`));
    if (code === "token_expired") return socket.close(4001);
    if (code === "bad_request" && ref?.startsWith("await:")) {
      this.awaitUnsupported = true; // an older gateway: writes settle as the stream passes them
    } else if (code === "forbidden" && entity) {
      this.forbid(entity);
    } else if (entity) {
      // Its SUBSCRIBE was refused (busy, a bad position): again later, from a new snapshot if bad.
      this.subscribing.delete(entity);
      if (code === "bad_request") this.fresh.add(entity);
      const attempt = this.attempts.get(entity) ?? 0;
      this.attempts.set(entity, attempt + 1);
      this.later(() => this.enqueue(() => this.begin(entity, socket)), this.backoff(attempt));
    } else if (code === "forbidden" || code === "internal") {
      // A subscription ended without saying which: subscribe again from the positions, and
      // the gateway names the refused ones in its answers (their `ref`).
      for (const subscribed of [...this.subscribed]) {
        this.subscribed.delete(subscribed);
        this.liveHere.delete(subscribed);
        this.txs.drop(subscribed);
        this.caughtUp = this.caughtUp.filter((p) => p.entity !== subscribed);
        await this.begin(subscribed, socket);
      }
    }
    this.refreshStatus();
  }
}

/** Merges a commit's items into what one store transaction will write. */
function merge(entities: Map<string, EntityWrite>, items: Item[]): void {
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

export function createClient(options: ClientOptions): SyncClient {
  return new SyncClient(options);
}
