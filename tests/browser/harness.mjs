// What the browser scripts share: Debian's headless Chromium, launched the
// same way for each, and the TAP-style check that logs what passed.

import { chromium } from "playwright-core";
import { existsSync } from "node:fs";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

/** Throws `message` unless `condition`; logs it as passed otherwise. */
export function check(condition, message) {
  if (!condition) throw new Error(message);
  console.log(`ok - ${message}`);
}

/** Headless Chromium, or exit 2 saying how to install it. */
export async function launchChromium() {
  if (!existsSync(CHROMIUM)) {
    console.error(`${CHROMIUM} is missing: run \`make browser-setup\` (apt-get install chromium)`);
    process.exit(2);
  }
  return chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}
