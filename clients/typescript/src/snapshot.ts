/**
 * Snapshots (`GET /v1/snapshot`, NDJSON: a cursor line, then one row per line) into memory and
 * IndexedDB without blocking the page. The page parses a network chunk at a time (one
 * `JSON.parse` per chunk) and yields to the event loop every few milliseconds; storing the
 * rows, the costly half (IndexedDB serialises every value on the thread that puts it), runs in
 * a Web Worker that gets the same bytes, transferred, and writes them in large transactions.
 * Where workers cannot start (a Content-Security-Policy without `blob:`, Node), the page stores
 * the rows itself.
 */
import type { Row } from "./store.js";

/** The entity id of a row, as the gateway forms it: the key's text, or for a composite key a
 * JSON array of the columns' texts (`["7","u1"]`). */
export function idOf(row: Row, key: string | string[] = "id"): string {
  return typeof key === "string" ? String(row[key]) : JSON.stringify(key.map((k) => String(row[k])));
}

/** Lets the page run (input, rendering) between pieces of work. */
export const yieldToPage = (): Promise<void> => {
  const scheduler = (globalThis as { scheduler?: { yield?: () => Promise<void> } }).scheduler;
  return scheduler?.yield ? scheduler.yield() : new Promise((resolve) => setTimeout(resolve, 0));
};

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
  sinks: { rows?: (rows: Row[]) => void; bytes?: (chunk: Uint8Array) => void },
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
  if (cursor === undefined) cursor = (JSON.parse(text.split("\n")[0] || "{}") as { cursor?: string }).cursor;
  else if (sinks.rows) sinks.rows(parseLines(text));
  if (!cursor) throw new Error("a snapshot without a cursor");
  return cursor;
}

/** Stores a snapshot's rows (given as the snapshot's bytes) in a Web Worker. */
export interface SnapshotWorker {
  bytes(chunk: Uint8Array): void;
  /** Start writing: the entity's old rows and position are deleted first, in IndexedDB's order. */
  go(): void;
  /** Every row is stored; rejects when storing failed. */
  end(): Promise<void>;
  /** The snapshot could not be read to its end: stop. */
  abort(): void;
}

/**
 * The worker's code, run as `(source)()` inside it: it must not use anything from this
 * module's scope. It reads the snapshot's bytes as they come (skipping the cursor line),
 * parses them and, once told to go, deletes the entity's stored rows and position and puts
 * the new rows in transactions of about 5,000; IndexedDB runs transactions on one store in
 * the order they were made, so none waits for the previous one.
 */
function workerMain(): void {
  type Init = { db: string; entity: string; key: string | string[] };
  const scope = self as unknown as { onmessage: (e: MessageEvent) => void; postMessage: (m: unknown) => void };
  const decoder = new TextDecoder();
  let init: Init;
  let text = "";
  let skipped = false;
  let held: Row[] = [];
  let db: IDBDatabase | undefined;
  let go = false;
  let last: Promise<void> = Promise.resolve();
  let failure: unknown;
  let opened: () => void;
  const gate = new Promise<void>((resolve) => (opened = resolve));
  const ready: Row[][] = [];
  const id = (row: Row) =>
    typeof init.key === "string" ? String(row[init.key]) : JSON.stringify(init.key.map((k) => String(row[k])));
  const done = (tx: IDBTransaction) =>
    new Promise<void>((resolve, reject) => {
      tx.oncomplete = () => resolve();
      tx.onerror = tx.onabort = () => reject(tx.error ?? new Error("aborted"));
    });
  const put = (rows: Row[]) => {
    const tx = db!.transaction("rows", "readwrite");
    const store = tx.objectStore("rows");
    for (const row of rows) store.put(row, [init.entity, id(row)]);
    const complete = done(tx);
    complete.catch((e: unknown) => (failure ??= e));
    last = complete;
  };
  const flush = (all: boolean) => {
    if (held.length >= 5000 || (all && held.length)) {
      ready.push(held);
      held = [];
    }
    if (go && db) while (ready.length) put(ready.shift()!);
  };
  const lines = (body: string) => {
    for (const line of body.split("\n")) if (line) held.push(JSON.parse(line) as Row);
  };
  scope.onmessage = (event: MessageEvent) => {
    const m = event.data as { init?: Init; chunk?: Uint8Array; go?: boolean; end?: boolean };
    if (m.init) {
      init = m.init;
      const open = indexedDB.open(init.db);
      open.onsuccess = () => {
        db = open.result;
        db.onversionchange = () => db!.close(); // a sign-out: do not block it
        if (go) start();
      };
      open.onerror = () => {
        failure ??= open.error;
        opened();
      };
    }
    if (m.chunk) {
      text += decoder.decode(m.chunk, { stream: true });
      if (!skipped) {
        const end = text.indexOf("\n");
        if (end < 0) return;
        skipped = true;
        text = text.slice(end + 1);
      }
      const end = text.lastIndexOf("\n");
      if (end >= 0) {
        lines(text.slice(0, end));
        text = text.slice(end + 1);
      }
      flush(false);
    }
    if (m.go) {
      go = true;
      if (db) start();
    }
    if (m.end) {
      if (skipped) lines(text + decoder.decode());
      flush(true);
      void finish();
    }
  };
  function start(): void {
    opened();
    const tx = db!.transaction(["rows", "meta"], "readwrite");
    tx.objectStore("rows").delete(IDBKeyRange.bound([init.entity], [init.entity, []]));
    tx.objectStore("meta").delete(init.entity);
    last = done(tx);
    last.catch((e: unknown) => (failure ??= e));
    flush(false);
  }
  async function finish(): Promise<void> {
    await gate;
    flush(true);
    await last.catch(() => undefined);
    scope.postMessage(failure ? { error: failure instanceof Error || failure instanceof DOMException ? failure.message : "failed" } : { done: true });
    db?.close();
  }
}

let workerUrl: string | undefined;

/** A worker storing `entity`'s snapshot into the database `db`, or undefined where workers cannot run. */
export function snapshotWorker(db: string, entity: string, key: string | string[]): SnapshotWorker | undefined {
  let worker: Worker;
  try {
    workerUrl ??= URL.createObjectURL(new Blob([`(${String(workerMain)})()`], { type: "text/javascript" }));
    worker = new Worker(workerUrl);
  } catch {
    return undefined;
  }
  const finished = new Promise<void>((resolve, reject) => {
    worker.onmessage = (event: MessageEvent<{ done?: boolean; error?: string }>) => {
      worker.terminate();
      if (event.data.done) resolve();
      else reject(new Error(`storing the snapshot of ${entity}: ${event.data.error}`));
    };
    worker.onerror = (event) => {
      worker.terminate();
      reject(new Error(`the snapshot worker failed: ${event.message}`));
    };
  });
  finished.catch(() => undefined);
  worker.postMessage({ init: { db, entity, key } });
  return {
    bytes: (chunk) => {
      const own = chunk.byteOffset === 0 && chunk.byteLength === chunk.buffer.byteLength ? chunk : chunk.slice();
      worker.postMessage({ chunk: own }, [own.buffer]);
    },
    go: () => worker.postMessage({ go: true }),
    end: () => (worker.postMessage({ end: true }), finished),
    abort: () => worker.terminate(),
  };
}
