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
 *
 * `SyncClient` is built in layers, a file each, each using only those below it:
 * tab.ts (this tab, its channel, the status it shows) → local-copy.ts (the rows in memory and
 * in IndexedDB) → stream-state.ts (where each entity's stream stands) → auth.ts (the token) →
 * hydration.ts (snapshots) → writes.ts (the outbox) → session.ts (the socket) → leader.ts
 * (leader election, the tabs' messages) → this file (the application's API).
 */
import { deleteDB } from "idb";
import { Entity } from "./entity.js";
import { Leader } from "./leader.js";
import type { ClientOptions, EntityOptions, Refusal } from "./options.js";
import type { Status, SyncStatus } from "./status.js";

export { Entity } from "./entity.js";
export type { ClientOptions, EntityOptions, Id, Refusal } from "./options.js";

export class SyncClient extends Leader {
  /** Resolves once the local database is open and the outbox loaded (rows may still be
   * loading or never fetched: see `waitForFirstSync`). */
  override readonly ready: Promise<void>;

  constructor(options: ClientOptions) {
    super(options);
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

  private open(entity: Entity): void {
    if (this.closed) return;
    this.loadSoon(entity.code);
    if (this.leading) this.follow(entity.code, entity.options);
    else this.tell({ t: "need", entity: entity.code, options: entity.options });
  }

  private firstSynced(entity: string): boolean {
    return (this.loads.get(entity) === "loaded" && this.syncedHere.has(entity)) || !!this.current.entities[entity]?.error;
  }
}

export function createClient(options: ClientOptions): SyncClient {
  return new SyncClient(options);
}
