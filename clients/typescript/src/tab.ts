/**
 * The bottom layer of `SyncClient` (see client.ts), what every layer above uses: this tab's
 * identity, its database and its channel to the other tabs of the profile, its timers, and
 * the status it shows the application. That status is worked out above (`refreshStatus`, in
 * stream-state.ts), from state this layer does not hold.
 */
import { retryDelay } from "./backoff.js";
import type { Commit } from "./commit.js";
import type { ClientOptions, EntityOptions } from "./options.js";
import { Replica } from "./replica.js";
import { derive, sameStatus, type Facts, type Status, type SyncStatus } from "./status.js";
import type { Store } from "./store.js";

/** What the tabs tell each other. */
export type Note =
  | { t: "commit"; commit: Commit }
  | { t: "stored"; seq: number }
  | { t: "status"; status: SyncStatus }
  | { t: "hello" }
  | { t: "lead" }
  | { t: "outbox" }
  | { t: "refused" }
  | { t: "need"; entity: string; options: EntityOptions }
  | { t: "signout" };

export abstract class Tab {
  readonly replica = new Replica();
  protected readonly tab = crypto.randomUUID();
  protected readonly base: string;
  protected store!: Store;
  protected name = "";
  protected channel?: BroadcastChannel;
  protected leading = false;
  protected closed = false;
  /** Releases the Web Locks this tab holds. */
  protected readonly releases: (() => void)[] = [];
  protected readonly timers = new Set<ReturnType<typeof setTimeout>>();
  protected readonly waiters = new Set<() => void>();
  protected current: SyncStatus;
  protected readonly statusListeners = new Set<(status: Status, detail: SyncStatus) => void>();
  protected readonly facts: Facts = {
    online: true,
    socket: "opening",
    failed: false,
    entities: {},
    uploading: false,
    pendingWrites: 0,
    closed: false,
  };
  /** Wakes a waiting reconnect or retry (the browser came online). */
  protected wake = new AbortController();

  constructor(protected readonly options: ClientOptions) {
    this.base = options.url.replace(/\/$/, "");
    this.current = derive(this.facts);
  }

  /** Writes made on this device that the server has not applied yet. */
  get pendingWrites(): number {
    return this.replica.pendingMutations().filter((m) => !m.cursor).length;
  }

  protected checkWaiters(): void {
    this.waiters.forEach((check) => check());
  }

  protected tell(note: Note): void {
    try {
      this.channel?.postMessage(note);
    } catch {
      // closed
    }
  }

  protected publish(status: SyncStatus): void {
    if (sameStatus(status, this.current)) return;
    this.current = status;
    if (this.leading) this.tell({ t: "status", status });
    this.statusListeners.forEach((l) => l(status.status, status));
    this.checkWaiters();
  }

  protected error(error: unknown): void {
    const message = error instanceof Error ? error.message : String(error);
    this.facts.lastError = { message, at: Date.now() };
    if (this.leading) this.refreshStatus();
    else this.publish({ ...this.current, lastError: this.facts.lastError });
    this.options.onError?.(error);
  }

  protected later(work: () => void, ms: number): void {
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      if (!this.closed) work();
    }, ms);
    this.timers.add(timer);
  }

  protected backoff(attempt: number, floorMs?: number): number {
    return retryDelay(attempt, floorMs, this.options.retry?.baseMs, this.options.retry?.capMs);
  }

  protected nudge(): void {
    this.wake.abort();
    this.wake = new AbortController();
  }

  /** Works the status out from what the leader knows and publishes it (see stream-state.ts). */
  protected abstract refreshStatus(): void;
}
