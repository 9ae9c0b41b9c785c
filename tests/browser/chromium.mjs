// Launches Debian's chromium (never a downloaded browser) headless, in a
// fresh user-data dir, through playwright-core. Shared by the scripts here.
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
export const FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic',
];

// Fires with {context, close}; close() ends the browser and removes its profile.
export async function launch(options = {}) {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: install it with \`apt-get install -y chromium\``);
  }
  const profile = mkdtempSync(join(tmpdir(), 'eventstreams-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: FLAGS,
    viewport: options.viewport || { width: 1280, height: 900 },
    ...options.context,
  });
  const close = async () => {
    await context.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  };
  return { context, close };
}

// --name value pairs from argv.
export function args(argv = process.argv.slice(2)) {
  const out = {};
  for (let i = 0; i < argv.length; i += 2) out[argv[i].replace(/^--/, '')] = argv[i + 1];
  return out;
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export function emit(object) {
  process.stdout.write(JSON.stringify(object) + '\n');
}

// Fails the whole script (exit 1) after `seconds`: the browser is closed first.
export function deadline(seconds, close) {
  const timer = setTimeout(async () => {
    process.stderr.write(`timed out after ${seconds} s\n`);
    await close();
    process.exit(1);
  }, seconds * 1000);
  timer.unref();
  return timer;
}
