import { describe, expect, it } from "vitest";
import { createClient } from "../../src/client.js";

const jwt = (claims: object) => `x.${btoa(JSON.stringify(claims))}.y`;

describe("one user's local copy", () => {
  it("is not made without a user in the token", async () => {
    const client = createClient({ url: "http://gateway", token: jwt({ exp: 9999999999 }) });
    await expect(client.ready).rejects.toThrow(/no sub/);
  });

  it("is dropped at sign-out, outbox and all", async () => {
    const token = jwt({ sub: "leaving" });
    const client = createClient({ url: "http://gateway", token });
    await client.ready;
    await client.clearLocalData();
    const names = (await indexedDB.databases()).map((d) => d.name);
    expect(names).not.toContain("pg-sync:leaving@http://gateway");
  });
});
