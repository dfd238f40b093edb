/**
 * Where the leader's stream stands for each entity it follows: forbidden, being fetched,
 * subscribing, subscribed, live. Moved by hydration.ts and session.ts, but held down here
 * because the status (`refreshStatus`), the token check (auth.ts) and the writes (writes.ts)
 * read it, and `catchingUp` (a transaction may have arrived in part) is decided from it.
 */
import { LocalCopy } from "./local-copy.js";
import type { EntityOptions } from "./options.js";
import { derive, type EntityStatus } from "./status.js";
import type { Piece } from "./transactions.js";

export abstract class StreamState extends LocalCopy {
  /** The entities the socket serves (for every tab), with their options. */
  protected readonly followed = new Map<string, EntityOptions>();
  /** Entities the user may not read (ERROR forbidden, 403): not followed until asked again
   * (`recheckForbiddenMs`, a new socket) or the claims change. */
  protected readonly forbidden = new Set<string>();
  /** Entities to fetch again (RESYNC, a new schema version). */
  protected readonly fresh = new Set<string>();
  protected readonly attempts = new Map<string, number>();
  protected socket?: WebSocket;
  /** Entities whose SUBSCRIBE is unanswered, with its `ref`: an answer to an earlier
   * SUBSCRIBE of the entity (one that a RESYNC replaced) is not this one's. */
  protected readonly subscribing = new Map<string, string>();
  protected readonly subscribed = new Set<string>();
  /** Entities caught up (SYNCED) on this socket. */
  protected readonly liveHere = new Set<string>();
  protected readonly hydrating = new Set<string>();
  /** Whole transactions held while the socket catches up. */
  protected caughtUp: Piece[] = [];

  protected override refreshStatus(): void {
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

  /** Whether some entity of this socket is not live yet (being fetched, replaying, about to
   * be subscribed): each entity's replay runs on its own, so until all are live, a
   * transaction may have arrived in part. Entities whose fetch keeps failing are not waited for. */
  protected catchingUp(): boolean {
    return [...this.followed.keys()].some((code) => !this.liveHere.has(code) && !this.forbidden.has(code) && !this.attempts.has(code));
  }
}
