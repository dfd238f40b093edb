/**
 * Whole transactions out of the stream's messages. A database transaction's changes may span
 * several messages (several entities); the gateway marks the message that carries the last
 * of them with `txEnd: true`. Messages are held here until a transaction is complete, then
 * released together, so that the app sees all of it or none of it. Pure: the caller passes
 * the time and arms the timer `deadline()` asks for.
 *
 * The rule for gateways that do not mark transactions (older ones): until the gateway said
 * it marks them (`txEnds` in SUBSCRIBED) or a `txEnd` was seen, held messages are released
 * after `IDLE_MS` without another message, at most `MAX_AGE_MS` after the first, and at once
 * before SYNCED or REACHED. After that, messages wait for it; `GUARD_MS` without any message,
 * or more than `MAX_CHANGES` changes held, release them anyway (a guard, reached only by a
 * transaction larger than the gateway's page).
 */

export interface Piece {
  entity: string;
  /** DELTA or INVALIDATE changes (none for SYNCED). */
  changes: { entityId: string; action: string; data?: Record<string, unknown>; schemaVersion?: number }[];
  /** The entity's position after this piece. */
  cursor: string;
  invalidate?: boolean;
  /** A new snapshot of the entity (the client's own piece, never a message): its rows when
   * this tab shows the entity (the stored ones are written apart). */
  snapshot?: { rows?: Map<string, Record<string, unknown>> };
}

export const IDLE_MS = 5;
export const MAX_AGE_MS = 20;
export const GUARD_MS = 1000;
export const MAX_CHANGES = 100_000;

export class Transactions {
  private held: Piece[] = [];
  private changes = 0;
  private first = 0;
  private last = 0;

  /** `marks`: the gateway is known to mark transaction ends (remembered across connections). */
  constructor(public marks = false) {}

  get size(): number {
    return this.held.length;
  }

  /** A DELTA or INVALIDATE message; returns what is now whole, in order. `sameStream` says
   * which held pieces its end closes: the live stream and each entity's catch-up end their
   * transactions apart, so the end of a catch-up's transaction must not release a live
   * transaction's first part (default: all of them). */
  add(piece: Piece, txEnd: boolean | undefined, now: number, sameStream: (held: Piece) => boolean = () => true): Piece[] | undefined {
    if (this.held.length === 0) this.first = now;
    this.last = now;
    this.held.push(piece);
    this.changes += piece.changes.length;
    if (txEnd) this.marks = true;
    if (this.changes >= MAX_CHANGES) return this.take();
    return txEnd ? this.takeWhere(sameStream) : undefined;
  }

  /** SYNCED (a position without changes): joins what is held, or stands alone. */
  synced(piece: Piece, now: number): Piece[] | undefined {
    if (this.held.length && this.marks) {
      this.held.push(piece);
      this.last = now;
      return undefined;
    }
    return [...this.take(), piece];
  }

  /** SYNCED or REACHED is about to be handled: what an unmarking gateway sent before it is whole. */
  barrier(): Piece[] | undefined {
    return this.marks || !this.held.length ? undefined : this.take();
  }

  /** Milliseconds from `now` until `expire` may release something, or undefined. */
  deadline(now: number): number | undefined {
    if (!this.held.length) return undefined;
    const due = this.marks ? this.last + GUARD_MS : Math.min(this.last + IDLE_MS, this.first + MAX_AGE_MS);
    return Math.max(0, due - now);
  }

  expire(now: number): Piece[] | undefined {
    const wait = this.deadline(now);
    return wait === 0 ? this.take() : undefined;
  }

  /** Forgets what is held of `entity` (its subscription ended). */
  drop(entity: string): void {
    this.takeWhere((p) => p.entity === entity);
  }

  /** Takes the held pieces `which` picks, in order, and keeps the others. */
  private takeWhere(which: (held: Piece) => boolean): Piece[] {
    const taken = this.held.filter(which);
    this.held = this.held.filter((p) => !which(p));
    this.changes = this.held.reduce((n, p) => n + p.changes.length, 0);
    return taken;
  }

  take(): Piece[] {
    const held = this.held;
    this.held = [];
    this.changes = 0;
    return held;
  }
}
