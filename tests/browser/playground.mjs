// Drives the playground page in headless Chromium as a person would:
//   node tests/browser/playground.mjs <base_url> <model> <prompt> <max_tokens> <screenshot.png>
// with the API token in the environment (KILN_TOKEN): opens <base_url>/playground, types the
// token (which lists the models), picks the model, types the prompt, sets max tokens and
// temperature 0, clicks Generate, waits for #status "done", takes a full-page screenshot and
// prints one JSON line {"text": <#output's text>}. On "error: ..." or a timeout it exits with 1
// (after a screenshot of what the page showed).
// Chromium is Debian's (`CHROMIUM`, default /usr/bin/chromium; `cargo xtask browser` installs it);
// --no-sandbox because tests run as root.
import { chromium } from 'playwright-core';

const [baseUrl, model, prompt, maxTokens, screenshot] = process.argv.slice(2);
if (!screenshot) {
  console.error('usage: node playground.mjs <base_url> <model> <prompt> <max_tokens> <screenshot.png>');
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox'],
});
const page = await browser.newPage({ viewport: { width: 1000, height: 800 } });
try {
  // The page's own problems show in the test's output.
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') console.error(`[page ${m.type()}] ${m.text()}`);
  });
  page.on('pageerror', (e) => console.error(`[page error] ${e.message}`));

  const url = baseUrl.replace(/\/+$/, '') + '/playground';
  const response = await page.goto(url);
  if (!response.ok()) throw new Error(`GET ${url} answered ${response.status()}`);
  await page.fill('#token', process.env.KILN_TOKEN || '');
  await page.dispatchEvent('#token', 'change');
  // The model list has loaded (or failed) once #status leaves "loading models…".
  await page.waitForFunction(() => !document.querySelector('#status').textContent.startsWith('loading'));
  const listed = await page.$$eval('#model option', (options) => options.map((o) => o.value));
  if (listed.includes(model)) await page.selectOption('#model', model);
  else await page.fill('#model-other', model);

  await page.fill('#prompt', prompt);
  await page.fill('#max-tokens', String(maxTokens));
  await page.fill('#temperature', '0');
  await page.click('#generate');
  await page.waitForFunction(
    () => {
      const status = document.querySelector('#status').textContent;
      return status === 'done' || status.startsWith('error');
    },
    null,
    { timeout: 60_000 },
  );
  await page.screenshot({ path: screenshot, fullPage: true });
  const status = await page.textContent('#status');
  if (status !== 'done') throw new Error(`the page says ${JSON.stringify(status)}`);
  const text = await page.$eval('#output', (el) => el.textContent);
  console.log(JSON.stringify({ text }));
} catch (e) {
  console.error(`playground test failed: ${e.message}`);
  process.exitCode = 1;
  // What the page showed, for the post-mortem.
  await page.screenshot({ path: screenshot, fullPage: true }).catch(() => {});
} finally {
  await browser.close();
}
