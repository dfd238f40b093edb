/**
 * `createClient`: a live local copy of tracked entities in IndexedDB, kept current over one
 * WebSocket per browser profile, with writes applied at once and sent from a durable outbox.
 *
 * One tab of the profile leads (a Web Lock): it owns the socket, the snapshots, the stored
 * rows and cursors and the outbox drain. Every tab keeps the rows in memory (`Replica`) and
 * hears the leader's changes over a BroadcastChannel; any tab may write (into the shared
 * outbox). When the leading tab closes, its lock passes to another tab, which resumes the
 * stream from the stored cursors.
 */
import { fullJitter } from "./backoff.js";
import { reaches } from "./cursor.js";
import { BATCH, send } from "./outbox.js";
import { matches, Replica, type Filter } from "./replica.js";
import { deleteDB } from "idb";
import { Store, type Action, type Meta, type Mutation, type Row } from "./store.js";

export type Status = "connecting" | "live" | "offline";

export interface ClientOptions {
  /** The gateway, e.g. `https://sync.example.com` (the socket is `/ws/sync` there). */
  url: string;
  token?: string;
  /** Called for a token at start and before the current one expires. */
  getToken?: () => string | Promise<string>;
  /** The origin tag of this profile's writes (default: one made up and kept per profile). */
  clientId?: string;
  /** A write the server refused because the row was not as expected (409). Its optimistic
   * state is already rolled back (the server wins); write again to merge. */
  onConflict?: (conflict: Refusal) => void;
  /** A write refused by row-level security, privileges or as malformed (403, 400). */
  onRejected?: (rejection: Refusal) => void;
  /** Failures that do not stop the client: storage refused (it goes on from memory), an entity
   * that cannot be fetched. */
  onError?: (error: unknown) => void;
  /** Retries (reconnects, writes) wait a random time up to `baseMs`·2^attempt, at most `capMs`
   * (defaults 1 s and 32 s). */
  retry?: { baseMs?: number; capMs?: number };
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

interface Change {
  entityId: string;
  action: Action;
  data?: Row;
  schemaVersion?: number;
}

/** What the leading tab tells the others. */
type Note =
  | { t: "rows"; entity: string; puts: [string, Row][]; deletes: string[] }
  | { t: "clear"; entity: string }
  | { t: "outbox" }
  | { t: "status"; status: Status }
  | { t: "refused"; refusal: Refusal }
  | { t: "need"; entity: string; options: EntityOptions };

const HYDRATE_BATCH = 5000;
const PING_EVERY_MS = 15000;

const sleep = (ms: number, wake?: AbortSignal) =>
  new Promise<void>((resolve) => {
    const timer = setTimeout(resolve, ms);
    wake?.addEventListener("abort", () => (clearTimeout(timer), resolve()), { once: true });
  });

/** The claims of a JWT (unverified: only to name the local database and plan refreshes). */
function claims(token: string): { sub?: string; exp?: number } {
  try {
    const part = token.split(".")[1] ?? "";
    return JSON.parse(atob(part.replace(/-/g, "+").replace(/_/g, "/"))) as { sub?: string; exp?: number };
  } catch {
    return {};
  }
}

export class Entity {
  constructor(
    private readonly client: SyncClient,
    readonly code: string,
    readonly options: EntityOptions,
  ) {}


  /** The key of a row, as the gateway names it (`7`, or `["7","u1"]` for a composite key). */
  idOf(row: Row): string {
    const key = this.options.key ?? "id";
    if (typeof key === "string") return String(row[key]);
    return JSON.stringify(key.map((k) => String(row[k])));
  }

  get(id: string): Row | undefined {
    return this.client.replica.view(this.code).get(id);
  }

  all(): Row[] {
    return [...this.client.replica.view(this.code).values()];
  }

  where(filter: Filter): Row[] {
    return this.all().filter((row) => matches(row, filter));
  }

  /** Calls `callback` with the matching rows now and after every change; returns the unsubscribe. */
  subscribe(filter: Filter | undefined, callback: (rows: Row[]) => void): () => void {
    const run = () => callback(filter ? this.where(filter) : this.all());
    const stop = this.client.replica.listen(this.code, run);
    run();
    return stop;
  }

  insert(row: Row): Promise<string> {
    return this.client.write(this.code, "CREATE", this.idOf(row), row);
  }

  /** Sets these columns; `expect` makes the write conditional on the server's current values. */
  update(id: string, patch: Row, options: { expect?: Row } = {}): Promise<string> {
    return this.client.write(this.code, "UPDATE", id, patch, options.expect);
  }

  delete(id: string, options: { expect?: Row } = {}): Promise<string> {
    return this.client.write(this.code, "DELETE", id, undefined, options.expect);
  }
}

export class SyncClient {
  readonly replica = new Replica();
  /** Resolves once the stored rows and outbox are loaded. */
  readonly ready: Promise<void>;
  private readonly entities = new Map<string, Entity>();
  private readonly meta = new Map<string, Meta>();
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
  private socket?: WebSocket;
  private draining = false;
  private currentStatus: Status = "connecting";
  private readonly statusListeners = new Set<(status: Status) => void>();
  /** Wakes a waiting reconnect or retry (the browser came online, a tab wrote). */
  private wake = new AbortController();
  private releaseLead?: () => void;
  /** Server changes not yet in the store, per entity (`undefined`: deleted); see `stash`. */
  private unstored = new Map<string, { rows: Map<string, Row | undefined>; meta?: Meta; drop: boolean }>();
  private storing: Promise<void> = Promise.resolve();
  private storeScheduled = false;
  /** Socket messages are handled one after the other, in order. */
  private queue: Promise<void> = Promise.resolve();
  /** Entities of this socket whose SUBSCRIBE is sent and not yet answered: messages of an
   * earlier subscription (before a RESYNC) still on the way are dropped meanwhile. */
  private readonly subscribing = new Set<string>();
  /** Entities subscribed on this socket. */
  private readonly subscribed = new Set<string>();

  constructor(private readonly options: ClientOptions) {
    this.base = options.url.replace(/\/$/, "");
    this.ready = this.start();
  }

  entity(code: string, options: EntityOptions = {}): Entity {
    let entity = this.entities.get(code);
    if (entity) Object.assign(entity.options, options);
    if (!entity) {
      this.entities.set(code, (entity = new Entity(this, code, options)));
      void this.ready.then(() => (this.leading ? this.follow(entity!) : this.tell({ t: "need", entity: code, options })));
    }
    return entity;
  }

  get status(): Status {
    return this.currentStatus;
  }

  /** Writes made on this device that the server has not confirmed yet. */
  get pendingWrites(): number {
    return this.replica.pendingMutations().filter((m) => !m.cursor).length;
  }

  onStatus(listener: (status: Status) => void): () => void {
    this.statusListeners.add(listener);
    return () => this.statusListeners.delete(listener);
  }

  close(): void {
    this.closed = true;
    this.releaseLead?.();
    this.socket?.close(1000);
    this.channel?.close();
    this.channel = undefined;
    this.wake.abort();
  }

  private async start(): Promise<void> {
    this.token = await this.freshToken();
    // The local copy is the user's: one database per user, and no user, no database.
    const sub = claims(this.token).sub;
    if (!sub) throw new Error("pg-sync: the token has no sub (user id)");
    this.sub = sub;
    const name = (this.name = `pg-sync:${sub}@${this.base}`);
    this.store = await Store.open(name, (e) => this.error(e));
    const stored = await this.store.load();
    stored.rows.forEach((rows, entity) => this.replica.applySynced(entity, rows, []));
    this.replica.setPending(stored.outbox);
    const storage = globalThis.localStorage as Storage | undefined;
    this.clientId = this.options.clientId ?? storage?.getItem(`${name}:client`) ?? crypto.randomUUID();
    storage?.setItem(`${name}:client`, this.clientId);
    if (typeof BroadcastChannel !== "undefined") {
      this.channel = new BroadcastChannel(name);
      this.channel.onmessage = (event: MessageEvent<Note>) => void this.hear(event.data);
    }
    globalThis.addEventListener?.("online", () => this.nudge());
    globalThis.addEventListener?.("offline", () => this.setStatus("offline"));
    globalThis.addEventListener?.("visibilitychange", () => {
      if (document.visibilityState === "visible") this.ping(); // a slept socket shows itself
    });
    if (globalThis.navigator?.locks) {
      void navigator.locks.request(`${name}:leader`, () => this.lead());
    } else {
      void this.lead();
    }
  }

  /** Holds the lead until the tab goes: the socket, the snapshots and the outbox drain. */
  private async lead(): Promise<void> {
    if (this.closed) return;
    this.leading = true;
    const held = new Promise<void>((resolve) => (this.releaseLead = resolve));
    // Resume what any tab had synced, from where the last leader stored it.
    (await this.store.meta()).forEach((meta, entity) => this.meta.set(entity, meta));
    for (const entity of this.meta.keys()) this.entity(entity);
    void this.connect();
    void this.drain();
    return held;
  }

  private async hear(note: Note): Promise<void> {
    switch (note.t) {
      case "rows":
        return this.replica.applySynced(note.entity, note.puts, note.deletes);
      case "clear":
        this.meta.delete(note.entity);
        return this.replica.clear(note.entity);
      case "outbox": {
        const outbox = await this.store.outbox();
        if (outbox) this.replica.setPending(outbox);
        if (this.leading) void this.drain();
        return;
      }
      case "status":
        return this.setStatus(note.status);
      case "refused":
        return this.report(note.refusal);
      case "need":
        if (this.leading && !this.entities.has(note.entity)) this.entity(note.entity, note.options);
    }
  }

  private tell(note: Note): void {
    this.channel?.postMessage(note);
  }

  private setStatus(status: Status): void {
    if (status === this.currentStatus) return;
    this.currentStatus = status;
    if (this.leading) this.tell({ t: "status", status });
    this.statusListeners.forEach((l) => l(status));
  }

  private error(error: unknown): void {
    this.options.onError?.(error);
  }

  private backoff(attempt: number): number {
    return fullJitter(attempt, this.options.retry?.baseMs, this.options.retry?.capMs);
  }

  private nudge(): void {
    this.wake.abort();
    this.wake = new AbortController();
  }

  private async freshToken(): Promise<string> {
    const exp = claims(this.token).exp;
    if (this.options.getToken && (!this.token || (exp && exp * 1000 - Date.now() < 60000))) {
      this.token = await this.options.getToken();
      if (this.sub && claims(this.token).sub !== this.sub) {
        // Another user: this user's rows and writes must not travel under their token.
        this.close();
        throw new Error("pg-sync: the token is for another user; make a new client for them");
      }
    }
    return this.token || this.options.token || "";
  }

  /** Forgets everything this user's client stored on this device (at sign-out): the rows,
   * the cursors, the outbox. The client is closed. */
  async clearLocalData(): Promise<void> {
    await this.ready.catch(() => undefined);
    this.close();
    this.store?.close();
    if (this.name) {
      (globalThis.localStorage as Storage | undefined)?.removeItem(`${this.name}:client`);
      await deleteDB(this.name);
    }
  }

  // ---- writes -------------------------------------------------------------------------

  async write(entityCode: string, action: Action, entityId: string, data?: Row, expect?: Row): Promise<string> {
    await this.ready;
    const mutation: Mutation = { id: crypto.randomUUID(), entityCode, action, entityId, data, expect, tab: this.tab };
    mutation.seq = (await this.store.enqueue(mutation)) ?? Date.now() * 1000 + this.replica.pendingMutations().length;
    this.replica.setPending([...this.replica.pendingMutations(), mutation]);
    this.tell({ t: "outbox" });
    if (this.leading) void this.drain();
    return mutation.id;
  }

  /** Sends the outbox in order, in batches, until it is empty (leader only). */
  private async drain(): Promise<void> {
    if (this.draining || !this.leading) return;
    this.draining = true;
    try {
      for (let attempt = 0; !this.closed; ) {
        const batch = this.replica.pendingMutations().filter((m) => !m.cursor).slice(0, BATCH);
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
          for (const m of batch) await this.sent(m, outcome.cursor);
        } else if (outcome.kind === "refused") {
          attempt = 0;
          const mutation = batch.find((m) => m.id === outcome.id)!;
          await this.finish(mutation);
          const refusal = { mutation, status: outcome.status, error: outcome.error, current: outcome.current };
          this.tell({ t: "refused", refusal });
          this.report(refusal);
        } else if (outcome.kind === "unauthorized" && this.options.getToken && attempt === 0) {
          attempt++;
          this.token = await this.options.getToken();
        } else {
          const wait = outcome.kind === "retry" ? outcome.afterMs : undefined;
          await sleep(wait ?? this.backoff(attempt++), this.wake.signal);
        }
      }
    } finally {
      this.draining = false;
    }
  }

  /** The server applied `m`: its overlay stays until the stream brings the change back. */
  private async sent(m: Mutation, cursor: string): Promise<void> {
    m.cursor = cursor;
    const position = this.meta.get(m.entityCode)?.cursor;
    if (position && reaches(position, cursor)) return this.finish(m);
    await this.store.updateMutation(m);
    this.replica.setPending([...this.replica.pendingMutations()]);
    this.tell({ t: "outbox" });
  }

  private async finish(m: Mutation): Promise<void> {
    await this.store.removeMutation(m.seq);
    this.replica.setPending(this.replica.pendingMutations().filter((p) => p.id !== m.id));
    this.tell({ t: "outbox" });
  }

  private report(refusal: Refusal): void {
    if (refusal.mutation.tab !== this.tab) return; // the tab that wrote it is told
    if (refusal.status === 409) this.options.onConflict?.(refusal);
    else this.options.onRejected?.(refusal);
  }

  // ---- the stream (leader only) ---------------------------------------------------------

  private async connect(): Promise<void> {
    for (let attempt = 0; !this.closed; ) {
      this.setStatus(globalThis.navigator?.onLine === false ? "offline" : "connecting");
      const wasLive = await this.session().catch((e: unknown) => (this.error(e), false));
      if (this.closed) return;
      attempt = wasLive ? 0 : attempt + 1;
      this.setStatus(globalThis.navigator?.onLine === false ? "offline" : "connecting");
      await sleep(this.backoff(attempt), this.wake.signal);
    }
  }

  /** One socket, until it closes; true when it went live. */
  private async session(): Promise<boolean> {
    const token = await this.freshToken();
    // Its own origin tag, so that this profile's writes come back on the stream.
    const url = `${this.base.replace(/^http/, "ws")}/ws/sync?token=${encodeURIComponent(token)}&clientId=${crypto.randomUUID()}`;
    const socket = new WebSocket(url);
    this.socket = socket;
    let live = false;
    let lastPong = Date.now();
    const synced = new Set<string>();
    this.subscribing.clear();
    this.subscribed.clear();
    const timers: ReturnType<typeof setTimeout>[] = [];
    await new Promise<void>((resolve) => {
      socket.onopen = () => {
        for (const entity of this.entities.values()) this.enqueue(() => this.begin(entity, socket));
        timers.push(
          setInterval(() => {
            if (Date.now() - lastPong > 2 * PING_EVERY_MS + 5000) socket.close(4000, "no pong");
            else this.ping();
          }, PING_EVERY_MS),
        );
        const exp = claims(token).exp;
        if (this.options.getToken && exp) {
          timers.push(setTimeout(() => void this.reauthenticate(socket), Math.max(0, exp * 1000 - Date.now() - 60000)));
        }
        void this.drain();
      };
      socket.onmessage = (event: MessageEvent<string>) => {
        const message = JSON.parse(event.data) as { type: string; payload?: Record<string, unknown> };
        if (message.type === "PONG") lastPong = Date.now();
        if (message.type === "SYNCED") {
          synced.add(message.payload?.entityCode as string);
          if ([...this.entities.keys()].every((e) => synced.has(e))) {
            live = true;
            this.setStatus("live");
          }
        }
        this.enqueue(() => this.handle(message.type, message.payload ?? {}, socket));
      };
      socket.onclose = () => resolve();
    });
    timers.forEach(clearInterval);
    return live;
  }

  private enqueue(work: () => Promise<void>): void {
    this.queue = this.queue.then(work).catch((e: unknown) => this.error(e));
  }

  private ping(): void {
    if (this.socket?.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify({ type: "PING" }));
  }

  private async reauthenticate(socket: WebSocket): Promise<void> {
    this.token = "";
    const token = await this.freshToken();
    if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "AUTH", payload: { token } }));
  }

  /** A newly opened socket or a new entity: fetch it if there is no cursor, then subscribe from it. */
  private follow(entity: Entity): void {
    if (this.socket?.readyState === WebSocket.OPEN) this.enqueue(() => this.begin(entity, this.socket!));
  }

  private async begin(entity: Entity, socket: WebSocket): Promise<void> {
    if (this.subscribing.has(entity.code) || this.subscribed.has(entity.code)) return;
    this.subscribing.add(entity.code);
    if (!this.meta.has(entity.code)) await this.hydrate(entity);
    const meta = this.meta.get(entity.code);
    if (!meta || socket.readyState !== WebSocket.OPEN) return;
    const mode = entity.options.mode ?? "delta";
    socket.send(JSON.stringify({ type: "SUBSCRIBE", payload: { entityCode: entity.code, mode, since: meta.cursor, ref: entity.code } }));
  }

  /** Streams the entity's snapshot into the store, in large transactions; with `ids`, only
   * fetches those rows and returns them. */
  private async hydrate(entity: Entity, ids?: string[]): Promise<Map<string, Row>> {
    const query = ids ? `?ids=${ids.map(encodeURIComponent).join(",")}` : "";
    const response = await fetch(`${this.base}/v1/snapshot/${encodeURIComponent(entity.code)}${query}`, {
      headers: { authorization: `Bearer ${await this.freshToken()}` },
    });
    if (!response.ok || !response.body) throw new Error(`snapshot of ${entity.code}: HTTP ${response.status}`);
    if (!ids) {
      this.stash(entity.code, [], [], undefined, true);
      this.replica.clear(entity.code);
      this.tell({ t: "clear", entity: entity.code });
    }
    let cursor: string | undefined;
    let text = "";
    let batch: [string, Row][] = [];
    const rows = new Map<string, Row>();
    const flush = () => {
      if (ids) batch.forEach(([id, row]) => rows.set(id, row));
      else this.applyRows(entity.code, batch, [], undefined);
      batch = [];
    };
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read()) {
      const lines = (text + chunk.value).split("\n");
      text = lines.pop() ?? "";
      for (const line of lines) {
        if (!line) continue;
        const value = JSON.parse(line) as Row;
        if (cursor === undefined) cursor = value.cursor as string;
        else batch.push([entity.idOf(value), value]);
        if (batch.length >= HYDRATE_BATCH) flush();
      }
    }
    flush();
    if (!cursor) throw new Error(`snapshot of ${entity.code}: no cursor`);
    if (!ids) this.applyRows(entity.code, [], [], { cursor });
    return rows;
  }

  /** The server's changes: into memory and to the other tabs at once, into the store behind. */
  private applyRows(entity: string, puts: [string, Row][], deletes: string[], meta: Meta | undefined): void {
    if (meta) this.meta.set(entity, meta);
    this.replica.applySynced(entity, puts, deletes);
    this.tell({ t: "rows", entity, puts, deletes });
    this.stash(entity, puts, deletes, meta, false);
  }

  /** Queues changes for the store, merged per entity with those not yet written (`drop`:
   * forget the entity's stored rows first). One write runs at a time and takes everything
   * queued meanwhile, so a burst of messages costs a few transactions, not one each; rows
   * and their cursor still go in one transaction, so the store is always a consistent (if
   * slightly older) state to resume from. */
  private stash(entity: string, puts: [string, Row][], deletes: string[], meta: Meta | undefined, drop: boolean): void {
    let queued = this.unstored.get(entity);
    if (!queued || drop) this.unstored.set(entity, (queued = { rows: new Map(), drop: drop || !!queued?.drop }));
    for (const [id, row] of puts) queued.rows.set(id, row);
    for (const id of deletes) queued.rows.set(id, undefined);
    if (meta) queued.meta = meta;
    if (this.storeScheduled) return;
    this.storeScheduled = true;
    this.storing = this.storing.then(async () => {
      this.storeScheduled = false;
      const batch = this.unstored;
      this.unstored = new Map();
      for (const [entity, { rows, meta, drop }] of batch) {
        if (drop) await this.store.dropEntity(entity);
        const puts: [string, Row][] = [];
        const deletes: string[] = [];
        rows.forEach((row, id) => (row ? puts.push([id, row]) : deletes.push(id)));
        await this.store.apply(entity, puts, deletes, meta);
      }
    });
  }

  private async handle(type: string, payload: Record<string, unknown>, socket: WebSocket): Promise<void> {
    const code = payload.entityCode as string;
    const entity = this.entities.get(code);
    const cursor = payload.cursor as string | undefined;
    if (type === "SUBSCRIBED" && entity && payload.ref === code) {
      this.subscribing.delete(code);
      this.subscribed.add(code);
      return;
    }
    if (this.subscribing.has(code)) return; // an earlier subscription's message
    if (type === "SYNCED" && entity && cursor) {
      this.applyRows(code, [], [], { ...this.meta.get(code), cursor });
    } else if (type === "DELTA" && entity) {
      const changes = payload.changes as Change[];
      const version = changes.find((c) => c.schemaVersion !== undefined)?.schemaVersion;
      const known = this.meta.get(code)?.schemaVersion;
      if (version !== undefined && known !== undefined && version !== known) return this.resync(entity, socket);
      const puts: [string, Row][] = [];
      const deletes: string[] = [];
      for (const c of changes) {
        if (c.action === "DELETE") deletes.push(c.entityId);
        else puts.push([c.entityId, c.data ?? {}]);
      }
      this.applyRows(code, puts, deletes, { cursor: cursor!, schemaVersion: version ?? known });
    } else if (type === "INVALIDATE" && entity) {
      const ids = [...new Set((payload.changes as Change[]).map((c) => c.entityId))];
      const rows = await this.hydrate(entity, ids);
      const meta = { ...this.meta.get(code), cursor: cursor! };
      this.applyRows(code, [...rows], ids.filter((id) => !rows.has(id)), meta);
    } else if (type === "RESYNC" && entity) {
      return this.resync(entity, socket);
    } else if (type === "ERROR") {
      if (payload.code === "token_expired") socket.close(4001);
      this.error(new Error(`${String(payload.code)}: ${String(payload.message)}`));
    }
    if (cursor && code) await this.settle(code, cursor);
  }

  /** Drops the entity's rows and position and fetches it again; the outbox stays. */
  private async resync(entity: Entity, socket: WebSocket): Promise<void> {
    socket.send(JSON.stringify({ type: "UNSUBSCRIBE", payload: { entityCode: entity.code } }));
    this.subscribed.delete(entity.code);
    this.meta.delete(entity.code);
    await this.begin(entity, socket);
  }

  /** Ends the writes to `entity` that the stream has now brought back. */
  private async settle(entity: string, position: string): Promise<void> {
    for (const m of this.replica.pendingMutations()) {
      if (m.entityCode === entity && m.cursor && reaches(position, m.cursor)) await this.finish(m);
    }
  }
}

export function createClient(options: ClientOptions): SyncClient {
  return new SyncClient(options);
}
