import { expect, it } from "vitest";
import { coreSize } from "../../scripts/size.mjs";

it("the core is at most 15 kB min+gzip, as an application ships it (with idb)", async () => {
  const bytes = await coreSize();
  console.log(`core bundle: ${(bytes / 1024).toFixed(1)} kB min+gzip`);
  expect(bytes).toBeLessThanOrEqual(15 * 1024);
});
