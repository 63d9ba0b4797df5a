// Drives headless Chromium (Debian's, never a downloaded one) with playwright-core for
// tests/integration/test_browser.py: one JSON command a line on stdin, one JSON answer a line
// on stdout ({"id", "ok", "value"} or {"id", "ok": false, "error"}).
//
// Environment: STREAMGATE_CHROMIUM (the executable), STREAMGATE_NODE_MODULES (where
// tests/integration/browser/setup.py installed the locked packages).
import { createRequire } from 'node:module';
import readline from 'node:readline';

const require = createRequire(`${process.env.STREAMGATE_NODE_MODULES}/`);
const { chromium } = require('playwright-core');

// As root, on a machine whose network is closed: no sandbox, no GPU, and none of Chromium's
// own background connections (their refusals only slow it down).
const browser = await chromium.launch({
  executablePath: process.env.STREAMGATE_CHROMIUM,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         '--disable-dev-shm-usage'],
});

let context = null;
let page = null;
let seen = null;

// Installed before any page script: what the page's CSP refused, and its storage writes.
const PROBE = `
  window.__cspViolations = [];
  document.addEventListener('securitypolicyviolation', (e) => {
    window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI);
  });
`;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const ops = {
  async open({ url, width = 1280, height = 860 }) {
    if (context) await context.close();
    context = await browser.newContext({ viewport: { width, height }, colorScheme: 'light' });
    await context.addInitScript(PROBE);
    seen = { console: [], errors: [], requests: [] };
    page = await context.newPage();
    page.on('console', (m) => seen.console.push({ type: m.type(), text: m.text() }));
    page.on('pageerror', (e) => seen.errors.push(String(e)));
    page.on('request', (r) => seen.requests.push({ url: r.url(), method: r.method(),
                                                  headers: r.headers() }));
    if (url) await page.goto(url, { waitUntil: 'load' });
    return true;
  },
  async click({ selector }) { await page.click(selector); return true; },
  async fill({ selector, value }) { await page.fill(selector, value); return true; },
  async press({ selector, key }) { await page.press(selector, key); return true; },
  // An expression in the page (it may be a promise, which is awaited).
  async evaluate({ expression }) { return await page.evaluate(expression); },
  // Polls an expression until it is truthy; page.waitForFunction would compile it with
  // new Function, which the playground's CSP (rightly) forbids.
  async waitFor({ expression, ms = 30000, interval = 25 }) {
    const until = Date.now() + ms;
    for (;;) {
      const value = await page.evaluate(expression);
      if (value) return value;
      if (Date.now() > until) throw new Error(`timed out after ${ms} ms waiting for ${expression}`);
      await sleep(interval);
    }
  },
  async screenshot({ path }) { await page.screenshot({ path }); return path; },
  async seen() { return seen; },
};

const rl = readline.createInterface({ input: process.stdin });
for await (const line of rl) {
  if (!line.trim()) continue;
  const { id, op, args } = JSON.parse(line);
  let answer;
  try {
    if (!(op in ops)) throw new Error(`unknown op ${op}`);
    answer = { id, ok: true, value: (await ops[op](args || {})) ?? null };
  } catch (e) {
    answer = { id, ok: false, error: String((e && e.stack) || e) };
  }
  process.stdout.write(`${JSON.stringify(answer)}\n`);
}
if (context) await context.close();
await browser.close();
