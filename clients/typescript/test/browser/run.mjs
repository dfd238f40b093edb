// Runs one browser scenario (its name is the argument) and exits 0 when it held.
import { launch, log } from "./harness.mjs";
import * as scenarios from "./scenarios.mjs";

const name = process.argv[2];
const scenario = scenarios[name];
if (!scenario) {
  console.error(`no scenario ${name}`);
  process.exit(2);
}
const browser = await launch();
try {
  await scenario(browser);
  log(`${name}: passed`);
} catch (error) {
  console.error(`${name}: ${error.stack ?? error}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
process.exit();
