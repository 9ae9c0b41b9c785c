// A picture of /v2/ui for a person to look at (not a test):
//   node screenshot.mjs --base http://127.0.0.1:8092 --hash 'stream=recentchange' --width 320 --out ui.png [--wait 4] [--expand true] [--scroll '.live'] [--full true]
import { args, launch, sleep } from './chromium.mjs';

const opt = args();
const width = Number(opt.width || 1280);
const { context, close } = await launch({ viewport: { width, height: Number(opt.height || 900) } });
try {
  const page = context.pages()[0] || await context.newPage();
  page.on('console', (m) => { if (m.type() === 'error') process.stderr.write(`console: ${m.text()}\n`); });
  await page.goto(`${opt.base}/v2/ui#${opt.hash || ''}`);
  await sleep(Number(opt.wait || 4) * 1000);
  if (opt.expand) await page.click('#events li summary');
  if (opt.scroll) await page.locator(opt.scroll).first().scrollIntoViewIfNeeded();
  await page.screenshot({ path: opt.out, fullPage: opt.full === 'true' });
  process.stdout.write(opt.out + '\n');
} finally {
  await close();
}
