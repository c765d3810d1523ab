// Drives the dashboard in headless Chromium for tests/test_dashboard.py:
//   node dashboard.mjs URL MODEL SCREENSHOT TIMEOUT_S
// Prints one JSON line when the page has loaded ({"ready": ...}); the test then starts a
// job. Watches the model's accuracy chart (the task's metric) without reloading the page, and once the job has
// ended, its last version is drawn and the fleet table has caught up, saves a screenshot
// and prints what it saw.
import { chromium } from "playwright-core";

const [url, model, screenshot, timeoutS] = process.argv.slice(2);
const deadline = Date.now() + Number(timeoutS) * 1000;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
});
const errors = [];
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.on("pageerror", (e) => errors.push(`pageerror: ${e.message}`));
  page.on("console", (m) => { if (m.type() === "error") errors.push(`console: ${m.text()}`); });
  await page.goto(url);
  await page.waitForFunction(() => Number(document.body.dataset.polls || 0) >= 1);
  const origin = await page.evaluate(() => performance.timeOrigin);
  const read = () => page.evaluate((m) => {
    const series = [...document.querySelectorAll(`svg[id="m-${m}-accuracy"] g.series`)];
    const jobs = [...document.querySelectorAll("#jobs tbody tr")].map(
      (r) => [...r.cells].map((c) => c.textContent));
    const fleet = [...document.querySelectorAll("#fleet tbody tr")].map(
      (r) => [...r.cells].map((c) => c.textContent));
    return {
      points: series.reduce((s, g) => s + Number(g.dataset.points), 0),
      epsilonCharts: document.querySelectorAll(`svg[id="eps-${m}"]`).length,
      jobs, fleet,
      summary: document.getElementById("summary").textContent,
      polls: Number(document.body.dataset.polls),
    };
  }, model);
  const first = await read();
  console.log(JSON.stringify({ ready: first }));

  const counts = [first.points];
  let last = first;
  for (;;) {
    if (Date.now() > deadline) throw new Error(`timed out; last seen ${JSON.stringify(last)}`);
    last = await read();
    if (last.points !== counts[counts.length - 1]) counts.push(last.points);
    // Done when the job has ended, its last version is drawn and every service's
    // telemetry has caught up with it (rounds column: one per version, κ1 = 1).
    const row = last.jobs.find((r) => r.length > 4 && r[1] === model);
    if (row && row[3] !== "running" && last.points === Number(row[4])
        && last.fleet.every((r) => r[7] === row[4])) break;
    await page.waitForTimeout(100);
  }
  await page.screenshot({ path: screenshot, fullPage: true });
  const sameDocument = (await page.evaluate(() => performance.timeOrigin)) === origin;
  console.log(JSON.stringify({ counts, last, sameDocument, errors }));
} finally {
  await browser.close();
}
