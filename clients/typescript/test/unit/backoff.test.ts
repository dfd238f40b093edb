import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { fullJitter, retryAfterMs } from "../../src/backoff.js";

describe("fullJitter", () => {
  it("waits a random time below the exponential cap, never above 32 s", () => {
    fc.assert(
      fc.property(fc.nat(100), fc.double({ min: 0, max: 1, maxExcluded: true, noNaN: true }), (attempt, r) => {
        const delay = fullJitter(attempt, 1000, 32000, () => r);
        return delay >= 0 && delay < Math.min(32000, 1000 * 2 ** attempt);
      }),
    );
  });

  it("spreads retries over the whole range", () => {
    expect(fullJitter(5, 1000, 32000, () => 0)).toBe(0);
    expect(fullJitter(5, 1000, 32000, () => 0.999)).toBe(31968);
    expect(fullJitter(0, 1000, 32000, () => 0.5)).toBe(500);
  });
});

describe("retryAfterMs", () => {
  it("reads seconds and HTTP dates", () => {
    expect(retryAfterMs("3")).toBe(3000);
    expect(retryAfterMs(new Date(10_000).toUTCString(), 4_000)).toBe(6000);
    expect(retryAfterMs(null)).toBeUndefined();
    expect(retryAfterMs("soon")).toBeUndefined();
  });
});
