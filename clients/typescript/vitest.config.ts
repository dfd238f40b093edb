import { defineConfig } from "vitest/config";

// Unit tests in Node, with fake-indexeddb standing in for the browser's IndexedDB. The
// browser end-to-end tests run in real Chromium from tests/tests/browser.rs.
export default defineConfig({
  test: { include: ["test/unit/**/*.test.ts"], setupFiles: ["fake-indexeddb/auto"] },
});
