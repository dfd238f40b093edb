/**
 * Writes: any tab puts them in the shared outbox and shows them at once; the leader sends the
 * outbox in order (outbox.ts) and keeps each write's optimistic state until the stream brings
 * its change back (REACHED, or a position past it). A refused write is rolled back, and each
 * refusal is told to one tab that has a handler for it.
 */
import { sleep } from "./backoff.js";
import { reaches } from "./cursor.js";
import { Hydration } from "./hydration.js";
import type { Refusal } from "./options.js";
import { BATCH, send } from "./outbox.js";
import type { Action, Mutation, Row, StoredRefusal } from "./store.js";

export abstract class Writes extends Hydration {
  /** Resolves once the client started (set by `SyncClient`). */
  abstract readonly ready: Promise<void>;
  protected clientId = "";
  protected readonly conflictHandlers = new Set<(refusal: Refusal) => void>();
  protected readonly rejectedHandlers = new Set<(refusal: Refusal) => void>();
  /** Refusals when storage failed (memory is the truth). */
  private readonly unstoredRefusals: StoredRefusal[] = [];
  private draining = false;
  private awaits = 0;
  protected awaitUnsupported = false;

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
  protected async drain(): Promise<void> {
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
    for (const sent of batch) {
      // The pending write as it is now: the outbox may have been read again from storage
      // meanwhile (another tab wrote), and one settled meanwhile is done with.
      const m = this.replica.pendingMutations().find((p) => p.id === sent.id);
      if (!m) continue;
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
  protected async settle(done: Mutation[]): Promise<void> {
    if (!done.length) return;
    const ids = new Set(done.map((m) => m.id));
    // Out of storage first: a read of the outbox under way (another tab wrote) then finds
    // them in memory too and leaves them to this, rather than taking them back.
    await this.store.removeMutations(done.map((m) => m.seq));
    this.replica.setPending(this.replica.pendingMutations().filter((p) => !ids.has(p.id)));
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
  protected async claimRefusals(): Promise<void> {
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
  protected awaitCursor(cursor: string): void {
    if (this.awaitUnsupported || this.catchingUp() || this.socket?.readyState !== WebSocket.OPEN) return;
    this.socket.send(JSON.stringify({ type: "AWAIT", payload: { cursor, ref: `await:${++this.awaits}` } }));
  }

  /** REACHED: every change up to `cursor` has been delivered, so the writes it covers are settled. */
  protected async reached(cursor: string): Promise<void> {
    if (this.catchingUp()) return; // asked again once caught up
    // It covers the entities live on this socket: a write of one that is not (its replay
    // refused, its snapshot failing: not waited for) settles when its stream passes it.
    const covered = (code: string) => this.liveHere.has(code) || this.forbidden.has(code) || !this.followed.has(code);
    await this.settle(this.replica.pendingMutations().filter((m) => m.cursor && covered(m.entityCode) && (m.cursor === cursor || reaches(cursor, m.cursor))));
    this.refreshStatus();
  }
}
