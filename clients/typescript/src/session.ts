/**
 * The leader's socket, the one of the browser profile: connected and connected again (after
 * a back-off, or when the server says), and for each entity it follows, the state machine
 * snapshot (if it has no position) → SUBSCRIBE → SUBSCRIBED → catch-up → SYNCED (live), with
 * RESYNC, forbidden entities and refused subscriptions on the way. Socket messages are
 * handled one at a time, in order; what they carry becomes whole transactions
 * (transactions.ts), then commits (`release`).
 */
import { claims } from "./auth.js";
import { fullJitter, sleep } from "./backoff.js";
import type { Item, RowChange } from "./commit.js";
import { reaches } from "./cursor.js";
import { HttpError } from "./hydration.js";
import type { EntityOptions } from "./options.js";
import type { Meta, Row } from "./store.js";
import { MAX_CHANGES, Transactions, type Piece } from "./transactions.js";
import { Writes } from "./writes.js";

interface Change {
  entityId: string;
  action: string;
  data?: Row;
  schemaVersion?: number;
}

const PING_EVERY_MS = 15000;
const RECHECK_FORBIDDEN_MS = 5 * 60_000;
/** The longest delay `setTimeout` keeps (a longer one fires at once). */
const LONGEST_TIMER_MS = 2 ** 31 - 1;
/** After the browser says it went offline, a socket that does not answer a PING within this is closed. */
const PROBE_MS = 5000;

export abstract class Session extends Writes {
  private lastPong = 0;
  /** Numbers each SUBSCRIBE's `ref`. */
  private subscriptions = 0;
  protected readonly txs = new Transactions();
  protected txTimer?: ReturnType<typeof setTimeout>;
  private authTimer?: ReturnType<typeof setTimeout>;
  /** Socket messages are handled one after the other, in order. */
  private queue: Promise<void> = Promise.resolve();
  /** The server asked to reconnect after this many ms (RECONNECT). */
  private reconnectAfter?: number;
  /** A REACHED that came while a transaction was held: handled once nothing is. */
  private reachedLater?: string;
  /** Forbidden entities with a check again scheduled. */
  private readonly rechecks = new Set<string>();

  protected onlineChanged(online: boolean): void {
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

  /** The socket serves `code` (for this tab or another). */
  protected follow(code: string, options: EntityOptions): void {
    this.followed.set(code, { ...this.followed.get(code), ...options });
    this.refreshStatus();
    const socket = this.socket;
    if (socket?.readyState === WebSocket.OPEN) this.enqueue(() => this.begin(code, socket));
  }

  protected async connect(): Promise<void> {
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
          this.reachedLater = undefined;
          this.subscribing.clear();
          this.subscribed.clear();
          this.liveHere.clear();
          // Forbidden ones too: rights may have been granted meanwhile.
          for (const code of this.followed.keys()) await this.begin(code, socket, true);
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

  protected ping(): void {
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

  /** Fetches the entity if it has no position (or must be fetched again), then subscribes from
   * its position. A forbidden entity only when `recheck`: it stays forbidden (not waited for,
   * and so shown) until its snapshot is answered. */
  private async begin(code: string, socket: WebSocket, recheck = false): Promise<void> {
    const busy = this.subscribing.has(code) || this.subscribed.has(code) || this.hydrating.has(code);
    if (socket !== this.socket || socket.readyState !== WebSocket.OPEN || busy || (this.forbidden.has(code) && !recheck)) return;
    const since = this.meta.get(code)?.cursor;
    if (!since || this.fresh.has(code)) {
      try {
        // Subscribed from the snapshot's cursor as soon as it is read, while the rows come.
        await this.hydrate(code, (cursor) => {
          if (this.forbidden.delete(code)) this.refreshStatus();
          this.subscribe(code, cursor, socket);
        });
      } catch (e) {
        if (this.subscribing.delete(code) && socket.readyState === WebSocket.OPEN) {
          socket.send(JSON.stringify({ type: "UNSUBSCRIBE", payload: { entityCode: code } }));
        }
        this.error(e);
        if (e instanceof HttpError && e.status === 403) this.forbid(code);
        else {
          if (e instanceof HttpError && e.status === 401) this.token = "";
          const attempt = this.attempts.get(code) ?? 0;
          this.attempts.set(code, attempt + 1);
          const wait = this.backoff(attempt, e instanceof HttpError ? e.retryAfter : undefined);
          this.later(() => this.enqueue(() => this.begin(code, socket, recheck)), wait);
        }
        // No longer waited for: the others' catch-up may be over.
        await this.caughtUpWith(undefined);
      }
      return;
    }
    this.subscribe(code, since, socket);
  }

  private subscribe(code: string, since: string, socket: WebSocket): void {
    if (socket !== this.socket || socket.readyState !== WebSocket.OPEN) return;
    const ref = `sub:${++this.subscriptions}`;
    this.subscribing.set(code, ref);
    const mode = this.followed.get(code)?.mode ?? "delta";
    socket.send(JSON.stringify({ type: "SUBSCRIBE", payload: { entityCode: code, mode, since, ref } }));
    this.refreshStatus();
  }

  private async handle(type: string, payload: Record<string, unknown>, socket: WebSocket): Promise<void> {
    if (socket !== this.socket || this.closed) return;
    const code = payload.entityCode as string | undefined;
    const cursor = payload.cursor as string;
    switch (type) {
      case "SUBSCRIBED":
        // The gateway marks transaction ends: wait for them from the first message on.
        if (payload.txEnds === true) this.txs.marks = true;
        if (!code || this.subscribing.get(code) !== payload.ref) return; // an earlier SUBSCRIBE's
        this.subscribing.delete(code);
        this.subscribed.add(code);
        return this.refreshStatus();
      case "DELTA":
      case "INVALIDATE": {
        if (!code || !this.subscribed.has(code)) {
          // Not ours, or an earlier subscription's (a RESYNC ended it): its changes are not
          // applied, but where it ends a transaction, what is held before it is whole.
          return payload.txEnd === true && this.txs.size ? this.release(this.txs.take()) : undefined;
        }
        const changes = payload.changes as Change[];
        // Any change of the message: it may hold several transactions.
        const known = this.meta.get(code)?.schemaVersion;
        if (known !== undefined && changes.some((c) => c.schemaVersion !== undefined && c.schemaVersion !== known)) {
          await this.resync(code, socket);
          // The refetch replaces this message; where it ends a transaction, the rest is whole.
          return payload.txEnd === true && this.txs.size ? this.release(this.txs.take()) : undefined;
        }
        const piece: Piece = { entity: code, changes, cursor, invalidate: type === "INVALIDATE" };
        return this.release(this.txs.add(piece, payload.txEnd === true, Date.now(), this.streamOf(code)));
      }
      case "SYNCED":
        if (!code || !this.subscribed.has(code)) return;
        this.liveHere.add(code);
        this.attempts.delete(code); // waited for again at the next catch-up
        await this.caughtUpWith(this.txs.synced({ entity: code, changes: [], cursor }, Date.now()));
        return this.refreshStatus();
      case "REACHED":
        await this.release(this.txs.barrier());
        // A write it covers may have its change in the transaction held: settled now, it
        // would show its old row until the transaction is whole.
        if (this.txs.size) {
          this.reachedLater = cursor;
          return;
        }
        return this.reached(cursor);
      case "RESYNC":
        if (!code || !this.followed.has(code)) return;
        return this.resync(code, socket);
      case "ERROR":
        return this.failure(payload, socket);
    }
  }

  /** Applies `released` and, if that ended the socket's catch-up (a SYNCED, or the last
   * entity caught up ended otherwise: refused, failed), what the catch-up held; REACHED then
   * covers every entity again, and is asked for the writes applied meanwhile. */
  private async caughtUpWith(released: Piece[] | undefined): Promise<void> {
    await this.release(released);
    if (!this.catchingUp()) new Set(this.replica.pendingMutations().map((m) => m.cursor)).forEach((c) => c && this.awaitCursor(c));
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
        const version = piece.changes.reduce<number | undefined>((v, c) => c.schemaVersion ?? v, undefined);
        const meta: Meta = { ...before, cursor: piece.cursor, schemaVersion: version ?? before?.schemaVersion };
        positions.set(piece.entity, meta);
        let changes: RowChange[];
        if (piece.invalidate) {
          const ids = [...new Set(piece.changes.map((c) => c.entityId))];
          // A message of no changes only ends a transaction: nothing to fetch.
          const fetched = ids.length ? await this.fetchRows(piece.entity, ids) : new Map<string, Row>();
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
    if (this.reachedLater !== undefined && !this.txs.size) {
      const cursor = this.reachedLater;
      this.reachedLater = undefined;
      await this.reached(cursor);
    }
    const wait = this.txs.deadline(Date.now());
    if (wait !== undefined) {
      this.txTimer = setTimeout(() => this.enqueue(() => this.release(this.txs.expire(Date.now()))), wait);
    }
  }

  /** Keeps the entity's rows on show and fetches it again; the outbox stays. What is held of
   * it is older than the coming snapshot and goes; what is held of other entities waits for
   * its transaction's end, and then for the refetch to catch up (`catchingUp`), so that no
   * commit shows half a transaction. */
  /** The held pieces that a transaction's end on a message of `code` closes. Until its
   * SYNCED an entity's messages are its replay's, whose transactions end apart from the live
   * stream's (the gateway holds the entity's live changes until then). */
  private streamOf(code: string): (held: Piece) => boolean {
    if (!this.liveHere.has(code)) return (held) => held.entity === code;
    return (held) => this.liveHere.has(held.entity);
  }

  private async resync(code: string, socket: WebSocket): Promise<void> {
    this.txs.drop(code);
    if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "UNSUBSCRIBE", payload: { entityCode: code } }));
    this.subscribed.delete(code);
    this.subscribing.delete(code);
    this.liveHere.delete(code);
    this.fresh.add(code);
    await this.begin(code, socket);
  }

  /** The socket no longer serves `code`: what is held of it goes (read again from its position). */
  private ended(code: string): void {
    this.txs.drop(code);
    this.caughtUp = this.caughtUp.filter((p) => p.entity !== code);
    this.subscribed.delete(code);
    this.subscribing.delete(code);
    this.liveHere.delete(code);
  }

  /** The user may no longer read the entity: its rows and position go, and it is asked again
   * after `recheckForbiddenMs` (and at each new socket). */
  private forbid(code: string): void {
    this.ended(code);
    if (!this.forbidden.has(code)) {
      this.forbidden.add(code);
      this.commit([{ entity: code, drop: true, meta: null }]);
      this.refreshStatus();
    }
    if (this.rechecks.has(code)) return;
    this.rechecks.add(code);
    this.later(() => {
      this.rechecks.delete(code);
      // Without a socket, the next one asks.
      const socket = this.socket;
      if (this.forbidden.has(code) && socket) this.enqueue(() => this.begin(code, socket, true));
    }, Math.min(LONGEST_TIMER_MS, Math.max(10, this.options.recheckForbiddenMs ?? RECHECK_FORBIDDEN_MS)) || RECHECK_FORBIDDEN_MS);
  }

  private async failure(payload: Record<string, unknown>, socket: WebSocket): Promise<void> {
    const code = payload.code as string;
    const ref = payload.ref as string | undefined;
    const entity = (payload.entityCode as string | undefined) ?? [...this.subscribing].find(([, r]) => r === ref)?.[0];
    this.error(new Error(`${code}: ${String(payload.message)}`));
    if (code === "token_expired") return socket.close(4001);
    const wasCatchingUp = this.catchingUp();
    if (code === "bad_request" && ref?.startsWith("await:")) {
      this.awaitUnsupported = true; // an older gateway: writes settle as the stream passes them
    } else if (code === "forbidden" && entity) {
      this.forbid(entity);
    } else if (entity) {
      // Its SUBSCRIBE was refused (busy, a bad position), or its replay failed after SUBSCRIBED:
      // again later, from a new snapshot if bad.
      this.ended(entity);
      if (code === "bad_request") this.fresh.add(entity);
      const attempt = this.attempts.get(entity) ?? 0;
      this.attempts.set(entity, attempt + 1);
      this.later(() => this.enqueue(() => this.begin(entity, socket)), this.backoff(attempt));
    } else if (ref?.startsWith("sub:")) {
      // The answer to a SUBSCRIBE replaced since: the one that replaced it is answered on its own.
    } else if (code === "forbidden" || code === "internal") {
      // A subscription ended without saying which: subscribe again from the positions, and
      // the gateway names the refused ones in its answers (their `ref`).
      for (const subscribed of [...this.subscribed]) {
        this.ended(subscribed);
        await this.begin(subscribed, socket);
      }
    }
    if (wasCatchingUp) await this.caughtUpWith(undefined);
    this.refreshStatus();
  }
}
