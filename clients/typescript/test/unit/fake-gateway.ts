/**
 * A gateway in memory, as the client sees it (SPEC 2.3, 2.4): a log of transactions, the
 * socket protocol (SUBSCRIBE with `since`, a replay per subscription then SYNCED, live DELTAs
 * in log order, `txEnd` on a message whose last change ends a transaction, AWAIT/REACHED,
 * RECONNECT), snapshots and `/v1/write`. Messages are split at random (seeded) and delivered
 * one per macrotask, so the client sees them as a socket would deliver them.
 */
import type { Row } from "../../src/store.js";

export interface LogChange {
  entity: string;
  id: string;
  action: "CREATE" | "UPDATE" | "DELETE";
  data?: Row;
  tx: number;
}

/** Cursor n: a mark whose xmax and maxId are n, so `reaches` orders cursors by n. */
export const cursorAt = (n: number) => `1.ab.${n}_${n}__${n}_${n}`;
const positionOf = (cursor: string) => Number(cursor.split(".")[2]!.split("_")[0]);

type Message = { type: string; payload?: Record<string, unknown> };

export class FakeGateway {
  readonly log: LogChange[] = [];
  /** The rows as each entity's subscribers see them (the log applied in order). */
  readonly tables = new Map<string, Map<string, Row>>();
  readonly sockets: FakeSocket[] = [];
  /** When each socket was opened (ms since the epoch). */
  readonly connectTimes: number[] = [];
  /** Refuse connections (the gateway is down). */
  down = false;
  /** Marks transaction ends (a current gateway) or not (an older one). */
  marks = true;
  /** Answers AWAIT (a current gateway) or refuses it as unknown (an older one). */
  awaits = true;
  /** Written by `/v1/write`, for the tests. */
  readonly writes: { id: string; entityCode: string; action: string; entityId: string; data?: Row }[][] = [];
  /** What `/v1/write` answers instead of applying (a status), once each. */
  readonly writeFaults: number[] = [];
  /** What snapshot requests answer instead (a status and a `Retry-After`), once each. */
  readonly snapshotFaults: { status: number; retryAfter?: string }[] = [];
  /** When each snapshot was asked for (ms since the epoch). */
  readonly snapshotTimes: number[] = [];
  /** What happens around each next snapshot, in order: a commit just `before` its rows
   * are read, or one `after` them, while it streams. */
  readonly snapshotHooks: { before?: () => void; after?: () => void }[] = [];
  /** Server-side changes made to a written row (a trigger, a default). */
  trigger?: (entity: string, row: Row) => Row;
  /** Changes of other rows that each write's transaction makes too (a trigger's), after it. */
  writeSideEffects: Omit<LogChange, "tx">[] = [];
  /** Messages that end a transaction are withheld until `releaseTxEnds()` (its end read
   * later); what comes after them is not, so use it for one transaction at a time: a later
   * transaction's first part would overtake the end, which a gateway never does. */
  holdTxEnds = false;
  /** Entities whose replay does not end: SUBSCRIBE is answered with SUBSCRIBED only (a test
   * ends it, e.g. with an ERROR). */
  readonly endlessReplays = new Set<string>();
  /** Entities the user may not read: their snapshot answers 403. */
  readonly forbidden = new Set<string>();
  private readonly heldTxEnds: [FakeSocket, Message][] = [];
  private tx = 0;
  private random: () => number;
  /** Delivery is held (a slow network) until `resume()`. */
  private paused = false;

  constructor(seed = 1) {
    let s = seed;
    this.random = () => ((s = (s * 1103515245 + 12345) % 2147483648) / 2147483648);
  }

  table(entity: string): Map<string, Row> {
    let table = this.tables.get(entity);
    if (!table) this.tables.set(entity, (table = new Map<string, Row>()));
    return table;
  }

  /** Commits one transaction of changes (in order) and sends it to live subscribers. */
  commit(changes: Omit<LogChange, "tx">[]): number {
    const tx = ++this.tx;
    for (const change of changes) {
      this.log.push({ ...change, tx });
      const table = this.table(change.entity);
      if (change.action === "DELETE") table.delete(change.id);
      else table.set(change.id, change.data!);
    }
    for (const socket of this.sockets) socket.live(this.log.length - changes.length);
    return tx;
  }

  get cursor(): string {
    return cursorAt(this.log.length);
  }

  pause(): void {
    this.paused = true;
  }

  resume(): void {
    this.paused = false;
    this.sockets.forEach((s) => s.flush());
  }

  /** Sends the messages `holdTxEnds` withheld, and withholds no more. */
  releaseTxEnds(): void {
    this.holdTxEnds = false;
    this.heldTxEnds.splice(0).forEach(([socket, message]) => socket.push(message));
  }

  /** Whether `message` is to be withheld from `socket` (`holdTxEnds`). */
  withholds(socket: FakeSocket, message: Message): boolean {
    if (!this.holdTxEnds || message.payload?.txEnd !== true) return false;
    this.heldTxEnds.push([socket, message]);
    return true;
  }

  isPaused(): boolean {
    return this.paused;
  }

  /** Splits changes into messages as the gateway may: consecutive changes of one entity, cut
   * at random (also inside or past a transaction's end); `txEnd` on a message whose last
   * change ends its transaction. */
  messages(changes: { change: LogChange; at: number }[], type = "DELTA"): Message[] {
    const out: Message[] = [];
    let i = 0;
    while (i < changes.length) {
      let j = i + 1;
      while (j < changes.length && changes[j]!.change.entity === changes[i]!.change.entity && this.random() < 0.7) j++;
      const part = changes.slice(i, j);
      const last = part.at(-1)!;
      const txEnd = j === changes.length || changes[j]!.change.tx !== last.change.tx;
      out.push({
        type,
        payload: {
          entityCode: last.change.entity,
          changes: part.map(({ change }) => ({
            entityId: change.id,
            action: change.action,
            ...(type === "DELTA" && change.action !== "DELETE" ? { data: change.data } : {}),
          })),
          timestamp: "t",
          cursor: cursorAt(last.at + 1),
          ...(txEnd && this.marks ? { txEnd: true } : {}),
        },
      });
      i = j;
    }
    return out;
  }

  snapshot(entity: string, ids?: string[]): string {
    const rows = [...this.table(entity)].filter(([id]) => !ids || ids.includes(id)).map(([, row]) => JSON.stringify(row));
    return [JSON.stringify({ cursor: this.cursor }), ...rows].join("\n") + "\n";
  }

  /** `fetch` as the client calls it. */
  fetch = async (input: string | URL | Request, init?: RequestInit): Promise<Response> => {
    await Promise.resolve();
    const url = new URL(input instanceof Request ? input.url : input);
    const snapshot = url.pathname.match(/^\/v1\/snapshot\/(.+)$/);
    if (snapshot) {
      this.snapshotTimes.push(Date.now());
      if (this.forbidden.has(decodeURIComponent(snapshot[1]!))) return new Response('{"error":"forbidden"}', { status: 403 });
      const hook = this.snapshotHooks.shift();
      hook?.before?.();
      const fault = this.snapshotFaults.shift();
      if (fault) return new Response("{}", { status: fault.status, headers: fault.retryAfter ? { "Retry-After": fault.retryAfter } : {} });
      const ids = url.searchParams.get("ids")?.split(",");
      const text = this.snapshot(decodeURIComponent(snapshot[1]!), ids);
      hook?.after?.();
      // In a few chunks, cut anywhere (inside a line, inside a character).
      const bytes = new TextEncoder().encode(text);
      const cuts = [0, ...[1, 2, 3].map(() => Math.floor(this.random() * bytes.length)).sort((a, b) => a - b), bytes.length];
      const body = new ReadableStream<Uint8Array>({
        start(controller) {
          for (let i = 1; i < cuts.length; i++) if (cuts[i]! > cuts[i - 1]!) controller.enqueue(bytes.slice(cuts[i - 1], cuts[i]));
          controller.close();
        },
      });
      return new Response(body, { status: 200 });
    }
    if (url.pathname === "/v1/write") {
      const fault = this.writeFaults.shift();
      if (fault) return new Response(JSON.stringify({ error: "conflict", current: {} }), { status: fault });
      const { mutations } = JSON.parse(init!.body as string) as { mutations: FakeGateway["writes"][number] };
      this.writes.push(mutations);
      this.commit([
        ...mutations.map((m): Omit<LogChange, "tx"> => {
          const table = this.table(m.entityCode);
          const existing = table.get(m.entityId);
          let data = m.action === "CREATE" ? { ...m.data } : { ...existing, ...m.data };
          if (this.trigger) data = this.trigger(m.entityCode, data);
          return { entity: m.entityCode, id: m.entityId, action: m.action === "DELETE" ? "DELETE" : existing ? "UPDATE" : "CREATE", data };
        }),
        ...this.writeSideEffects,
      ]);
      return new Response(JSON.stringify({ cursor: this.cursor, results: mutations.map((m) => ({ id: m.id, status: "applied" })) }), { status: 200 });
    }
    return new Response("{}", { status: 404 });
  };

  /** The `WebSocket` class the client constructs. */
  get WebSocket(): { new (url: string): FakeSocket; OPEN: number; CONNECTING: number; CLOSED: number } {
    // eslint-disable-next-line @typescript-eslint/no-this-alias
    const gateway = this;
    return class extends FakeSocket {
      constructor(url: string) {
        super(gateway, url);
      }
    };
  }
}

/** A WebSocket connected to a `FakeGateway`. */
export class FakeSocket {
  static readonly CONNECTING = 0;
  static readonly OPEN = 1;
  static readonly CLOSED = 3;
  readyState = 0;
  onopen?: () => void;
  onmessage?: (event: { data: string }) => void;
  onclose?: (event: { code: number }) => void;
  /** Subscriptions: entity → the log position it has been sent up to (undefined: replaying). */
  readonly subs = new Map<string, number | undefined>();
  private readonly outbox: Message[] = [];
  private sending = false;
  readonly received: Message[] = [];

  constructor(
    readonly gateway: FakeGateway,
    readonly url: string,
  ) {
    gateway.connectTimes.push(Date.now());
    if (gateway.down) {
      this.readyState = 3;
      setTimeout(() => this.onclose?.({ code: 1006 }), 0);
      return;
    }
    gateway.sockets.push(this);
    setTimeout(() => {
      if (this.readyState !== 0) return;
      this.readyState = 1;
      this.onopen?.();
    }, 0);
  }

  send(text: string): void {
    const message = JSON.parse(text) as Message;
    this.received.push(message);
    const p = message.payload ?? {};
    switch (message.type) {
      case "SUBSCRIBE": {
        const entity = p.entityCode as string;
        const since = positionOf(p.since as string);
        this.subs.set(entity, undefined);
        this.push({ type: "SUBSCRIBED", payload: { entityCode: entity, count: 1, cursor: p.since, ref: p.ref, ...(this.gateway.marks ? { txEnds: true } : {}) } });
        if (this.gateway.endlessReplays.has(entity)) return;
        // The replay: this entity's changes after `since`, then SYNCED at the live position.
        const missed = this.gateway.log.map((change, at) => ({ change, at })).filter(({ change, at }) => at >= since && change.entity === entity);
        this.gateway.messages(missed).forEach((m) => this.push(m));
        this.push({ type: "SYNCED", payload: { entityCode: entity, cursor: this.gateway.cursor, ref: p.ref } });
        this.subs.set(entity, this.gateway.log.length);
        return;
      }
      case "UNSUBSCRIBE":
        this.subs.delete(p.entityCode as string);
        return;
      case "AWAIT":
        if (!this.gateway.awaits) this.push({ type: "ERROR", payload: { code: "bad_request", message: "unknown variant AWAIT", ref: p.ref } });
        else this.push({ type: "REACHED", payload: { cursor: p.cursor, ref: p.ref } });
        return;
      case "PING":
        this.push({ type: "PONG" });
    }
  }

  /** Sends the live changes from log position `from` to this socket's subscriptions. */
  live(from: number): void {
    const changes = this.gateway.log
      .map((change, at) => ({ change, at }))
      .slice(from)
      .filter(({ change, at }) => this.subs.has(change.entity) && at >= (this.subs.get(change.entity) ?? Infinity));
    this.gateway.messages(changes).forEach((m) => this.push(m));
    for (const [entity, at] of this.subs) if (at !== undefined) this.subs.set(entity, this.gateway.log.length);
  }

  /** A server message sent before the ones still on their way (e.g. by a subscription the
   * client already ended). */
  interject(message: Message): void {
    this.outbox.unshift(message);
    this.flush();
  }

  /** A server message, delivered after the ones before it, one per macrotask. */
  push(message: Message): void {
    if (this.gateway.withholds(this, message)) return;
    this.outbox.push(message);
    this.flush();
  }

  flush(): void {
    if (this.sending || this.gateway.isPaused() || this.readyState !== 1) return;
    this.sending = true;
    setTimeout(() => {
      this.sending = false;
      const next = this.outbox.shift();
      if (!next || this.readyState !== 1 || this.gateway.isPaused()) {
        if (next) this.outbox.unshift(next);
        return;
      }
      this.onmessage?.({ data: JSON.stringify(next) });
      if (next.type === "RECONNECT") this.close(1012);
      this.flush();
    }, 0);
  }

  /** Delivered: nothing is waiting to be sent. */
  get idle(): boolean {
    return this.outbox.length === 0;
  }

  close(code = 1000): void {
    if (this.readyState === 3) return;
    this.readyState = 3;
    const at = this.gateway.sockets.indexOf(this);
    if (at >= 0) this.gateway.sockets.splice(at, 1);
    setTimeout(() => this.onclose?.({ code }), 0);
  }
}
