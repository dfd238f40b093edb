// Debian's Chromium, headless, as every browser program here starts it (playwright-core
// cannot download its own browser on these machines).
import { chromium } from "playwright-core";

export function launch() {
  return chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium", args: ["--no-sandbox"] });
}
