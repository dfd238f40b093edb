/**
 * Snapshots (`GET /v1/snapshot`, NDJSON: a cursor line, then one row per line) into memory and
 * IndexedDB without blocking the page. The page parses a network chunk at a time (one
 * `JSON.parse` per chunk) and yields to the event loop every few milliseconds; storing the
 * rows, the costly half (IndexedDB serialises every value on the thread that puts it), comes
 * after the read (so as not to slow it) and runs in a Web Worker that gets the bytes,
 * transferred, and writes them in large transactions. Where workers cannot start (a
 * Content-Security-Policy without `blob:`, Node), the page stores the rows itself.
 */
import type { Row } from "./store.js";

/** The entity id of a row, as the gateway forms it: the key's text, or for a composite key a
 * JSON array of the columns' texts (`["7","u1"]`). */
export function idOf(row: Row, key: string | string[] = "id"): string {
  return typeof key === "string" ? String(row[key]) : JSON.stringify(key.map((k) => String(row[k])));
}

/** Lets the page run between pieces of work: input, rendering and every task queued
 * meanwhile, socket messages included (a message posted to itself goes to the back of the
 * queue, unlike `scheduler.yield()`, and unlike `setTimeout` is never clamped to 4 ms). */
export const yieldToPage = (): Promise<void> =>
  new Promise((resolve) => {
    const channel = new MessageChannel();
    channel.port1.onmessage = () => {
      channel.port1.close();
      resolve();
    };
    channel.port2.postMessage(null);
  });

/** Parses complete NDJSON lines. */
function parseLines(lines: string): Row[] {
  const body = lines.trim();
  if (!body) return [];
  return JSON.parse(`[${body.includes("\n\n") ? body.split("\n").filter(Boolean).join(",") : body.replaceAll("\n", ",")}]`) as Row[];
}

/**
 * Reads a snapshot's body; returns its cursor. `rows` gets the rows of each network chunk (when
 * given, else rows are not parsed at all), `bytes` each chunk after it was read (to transfer).
 */
export async function readSnapshot(
  body: ReadableStream<Uint8Array>,
  sinks: { rows?: (rows: Row[]) => void; bytes?: (chunk: Uint8Array) => void; cursor?: (cursor: string) => void },
): Promise<string> {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let text = "";
  let cursor: string | undefined;
  let slice = performance.now();
  for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read()) {
    if (cursor === undefined || sinks.rows) {
      text += decoder.decode(chunk.value, { stream: true });
      if (cursor === undefined) {
        const end = text.indexOf("\n");
        if (end >= 0) {
          cursor = (JSON.parse(text.slice(0, end)) as { cursor: string }).cursor;
          sinks.cursor?.(cursor);
          text = sinks.rows ? text.slice(end + 1) : "";
        }
      }
      const end = text.lastIndexOf("\n");
      if (cursor !== undefined && sinks.rows && end >= 0) {
        const rows = parseLines(text.slice(0, end));
        text = text.slice(end + 1);
        sinks.rows(rows);
      }
    }
    sinks.bytes?.(chunk.value);
    if (performance.now() - slice > 8) {
      await yieldToPage();
      slice = performance.now();
    }
  }
  text += decoder.decode();
  if (cursor === undefined) {
    cursor = (JSON.parse(text.split("\n")[0] || "{}") as { cursor?: string }).cursor;
    if (!cursor) throw new Error("a snapshot without a cursor");
    sinks.cursor?.(cursor);
  } else if (sinks.rows) {
    sinks.rows(parseLines(text));
  }
  return cursor;
}

/** The rows of a snapshot's bytes (its first line, the cursor, skipped). */
export function rowsOf(chunks: Uint8Array[]): Row[] {
  const decoder = new TextDecoder();
  const text = chunks.map((c) => decoder.decode(c, { stream: true })).join("") + decoder.decode();
  return parseLines(text.slice(text.indexOf("\n") + 1));
}

/**
 * The worker's code, run as `(source)()` inside it: it must not use anything from this
 * module's scope. Given a snapshot's bytes, the database and the entity, it deletes the
 * entity's stored rows and position and puts the new rows in transactions of 5,000 (made
 * one after the other without waiting: IndexedDB runs them in order), then answers.
 */
function workerMain(): void {
  type Job = { db: string; entity: string; key: string | string[]; chunks: Uint8Array[] };
  const scope = self as unknown as { onmessage: (e: MessageEvent<Job>) => void; postMessage: (m: unknown) => void };
  const done = (tx: IDBTransaction) =>
    new Promise<void>((resolve, reject) => {
      tx.oncomplete = () => resolve();
      tx.onerror = tx.onabort = () => reject(tx.error ?? new Error("aborted"));
    });
  scope.onmessage = ({ data: job }) => void store(job);
  async function store(job: Job): Promise<void> {
    let db: IDBDatabase | undefined;
    try {
      db = await new Promise<IDBDatabase>((resolve, reject) => {
        const open = indexedDB.open(job.db);
        open.onsuccess = () => resolve(open.result);
        open.onerror = () => reject(open.error ?? new Error("open failed"));
      });
      db.onversionchange = () => db!.close(); // a sign-out: do not block it
      const decoder = new TextDecoder();
      const text = job.chunks.map((c) => decoder.decode(c, { stream: true })).join("") + decoder.decode();
      const lines = text.split("\n");
      const id = (row: Record<string, unknown>) =>
        typeof job.key === "string" ? String(row[job.key]) : JSON.stringify(job.key.map((k) => String(row[k])));
      const first = db.transaction(["rows", "meta"], "readwrite");
      first.objectStore("rows").delete(IDBKeyRange.bound([job.entity], [job.entity, []]));
      first.objectStore("meta").delete(job.entity);
      const all = [done(first)];
      for (let i = 1; i < lines.length; i += 5000) {
        const tx = db.transaction("rows", "readwrite");
        const store = tx.objectStore("rows");
        for (const line of lines.slice(i, i + 5000)) {
          if (!line) continue;
          const row = JSON.parse(line) as Record<string, unknown>;
          store.put(row, [job.entity, id(row)]);
        }
        all.push(done(tx));
      }
      await Promise.all(all);
      scope.postMessage({ done: true });
    } catch (e) {
      scope.postMessage({ error: e instanceof Error || e instanceof DOMException ? e.message : "failed" });
    } finally {
      db?.close();
    }
  }
}

let workerUrl: string | undefined;

/** Stores `entity`'s snapshot (its bytes) into the database `db` from a Web Worker; undefined
 * where workers cannot start. Rejects when storing failed. */
export function storeInWorker(db: string, entity: string, key: string | string[], chunks: Uint8Array[]): Promise<void> | undefined {
  let worker: Worker;
  try {
    workerUrl ??= URL.createObjectURL(new Blob([`(${String(workerMain)})()`], { type: "text/javascript" }));
    worker = new Worker(workerUrl);
  } catch {
    return undefined;
  }
  return new Promise<void>((resolve, reject) => {
    worker.onmessage = (event: MessageEvent<{ done?: boolean; error?: string }>) => {
      worker.terminate();
      if (event.data.done) resolve();
      else reject(new Error(`storing the snapshot of ${entity}: ${event.data.error}`));
    };
    worker.onerror = (event) => {
      worker.terminate();
      reject(new Error(`the snapshot worker failed: ${event.message}`));
    };
    const own = chunks.map((c) => (c.byteOffset === 0 && c.byteLength === c.buffer.byteLength ? c : c.slice()));
    worker.postMessage({ db, entity, key, chunks: own }, own.map((c) => c.buffer));
  });
}
