/**
 * Hydration: an entity's rows fetched whole (`GET /v1/snapshot`) when it has no position or
 * must be fetched again, kept in this tab's memory when the tab shows the entity, stored in
 * IndexedDB (by a worker when one can start), and shown together with the catch-up that
 * follows (`release`, in session.ts). The rows an INVALIDATE names are fetched the same way.
 */
import { Auth } from "./auth.js";
import { retryAfterMs } from "./backoff.js";
import { idOf, readSnapshot, rowsOf, storeInWorker, yieldToPage } from "./snapshot.js";
import type { Row } from "./store.js";

/** An HTTP answer that was not a success. */
export class HttpError extends Error {
  constructor(
    readonly status: number,
    what: string,
    readonly retryAfter?: number,
  ) {
    super(`${what}: HTTP ${status}`);
  }
}

/** Rows per IndexedDB transaction when the page stores a snapshot (a task of a few ms each). */
const PAGE_BATCH = 1000;

export abstract class Hydration extends Auth {
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
  protected async hydrate(code: string, onCursor: (cursor: string) => void): Promise<string> {
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

  /** INVALIDATE: the named rows as they are now. */
  protected async fetchRows(code: string, ids: string[]): Promise<Map<string, Row>> {
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
}
