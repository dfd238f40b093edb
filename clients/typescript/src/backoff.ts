/** Retry delays: "full jitter" (a random delay up to an exponential cap), so that many
 * clients that failed together do not come back together. */

/** The delay before retry number `attempt` (0 first): random in [0, min(cap, base·2^attempt)). */
export function fullJitter(attempt: number, baseMs = 1000, capMs = 32000, random = Math.random): number {
  return Math.floor(random() * Math.min(capMs, baseMs * 2 ** Math.min(attempt, 30)));
}

/** A `Retry-After` header in milliseconds (seconds or an HTTP date), or undefined. */
export function retryAfterMs(header: string | null, now = Date.now()): number | undefined {
  if (!header) return undefined;
  const seconds = Number(header);
  if (Number.isFinite(seconds)) return Math.max(0, seconds * 1000);
  const at = Date.parse(header);
  return Number.isNaN(at) ? undefined : Math.max(0, at - now);
}

/** The delay before retry number `attempt` when the server asked for `floorMs` at least
 * (`Retry-After`): the server's floor, or the jittered back-off when that is longer. */
export function retryDelay(attempt: number, floorMs: number | undefined, baseMs?: number, capMs?: number): number {
  return Math.max(floorMs ?? 0, fullJitter(attempt, baseMs, capMs));
}

/** Waits `ms`, or until `wake` aborts (the browser came online: retry now). */
export const sleep = (ms: number, wake?: AbortSignal) =>
  new Promise<void>((resolve) => {
    const timer = setTimeout(resolve, ms);
    wake?.addEventListener("abort", () => (clearTimeout(timer), resolve()), { once: true });
  });
