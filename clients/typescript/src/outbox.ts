/**
 * Sending the outbox: a batch of writes to `POST /v1/write` and what became of it. The
 * gateway applies a batch in one transaction (never in part) and each mutation id at most once,
 * so a batch whose answer was lost is simply sent again: what was applied answers `duplicate`.
 */
import { retryAfterMs } from "./backoff.js";
import type { Mutation, Row } from "./store.js";

/** Writes sent in one request (the gateway takes up to 500). */
export const BATCH = 100;

export type Outcome =
  /** Every mutation of the batch is applied (now or before); the stream reaching `cursor` brings them back. */
  | { kind: "applied"; cursor: string }
  /** One mutation was refused for good (409: `current` is the row as it is; 403, 400); the rest were not applied. */
  | { kind: "refused"; id: string; status: number; error: string; current?: Row }
  /** The token was refused: get a new one and send again. */
  | { kind: "unauthorized" }
  /** Network error, 5xx, 503 or 429: send again later (`afterMs` from `Retry-After`). */
  | { kind: "retry"; afterMs?: number };

export type Post = (body: string) => Promise<Response>;

export async function send(batch: Mutation[], clientId: string, post: Post): Promise<Outcome> {
  const mutations = batch.map(({ id, entityCode, action, entityId, data, expect }) => ({
    id,
    entityCode,
    action,
    entityId,
    data,
    expect,
  }));
  let response: Response;
  try {
    response = await post(JSON.stringify({ clientId, mutations }));
  } catch {
    return { kind: "retry" };
  }
  const body = (await response.json().catch(() => ({}))) as {
    cursor?: string;
    error?: string;
    mutation?: string;
    current?: Row;
  };
  if (response.ok && body.cursor) return { kind: "applied", cursor: body.cursor };
  if (response.status === 401) return { kind: "unauthorized" };
  if (response.status >= 400 && response.status < 500 && response.status !== 429) {
    // The gateway names the mutation it refused; without a name, the first one is at fault.
    const id = batch.some((m) => m.id === body.mutation) ? body.mutation! : batch[0]!.id;
    return { kind: "refused", id, status: response.status, error: body.error ?? "refused", current: body.current };
  }
  return { kind: "retry", afterMs: retryAfterMs(response.headers.get("Retry-After")) };
}
