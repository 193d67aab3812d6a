// Drives the `apa serve` page in Debian's chromium for tests/web/test_browser.py.
//
// Environment: APA_E2E_URL (the server), APA_E2E_CHROMIUM (the browser binary), APA_E2E_PROFILE (a fresh
// user-data directory), APA_E2E_SCREENSHOT (where to save the page).
// Protocol on stdout: one JSON object per line, {"event": ...}. After {"event": "rated"} it waits for one
// line on stdin (the test restarts the server meanwhile), then reloads and checks the session resumed.
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const WAIT_MS = 240_000;
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];
const env = (name) => {
  if (!process.env[name]) throw new Error(`set ${name}`);
  return process.env[name];
};
const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const lines = createInterface({ input: process.stdin });
const nextLine = () => new Promise((resolve) => lines.once("line", resolve));

async function waitForRound(page, round) {
  await page.waitForSelector(`body[data-phase="ready"][data-round="${round}"]`, { timeout: WAIT_MS });
}

async function rateRound(page, round, values) {
  await waitForRound(page, round);
  for (const [p, v] of values.entries()) {
    await page.getByTestId(v === null ? `skip-${p}` : `rate-${p}-${v}`).click();
  }
  await page.getByTestId("submit").click();
}

async function pageState(page) {
  return page.evaluate(() => ({
    phase: document.body.dataset.phase,
    round: Number(document.body.dataset.round),
    spent: Number(document.getElementById("spent").textContent),
    history: document.querySelectorAll("#history li").length,
    images: document.querySelectorAll("#cards .card img").length,
    hash: location.hash,
  }));
}

async function main() {
  const url = env("APA_E2E_URL");
  const context = await chromium.launchPersistentContext(env("APA_E2E_PROFILE"), {
    executablePath: env("APA_E2E_CHROMIUM"), headless: true, args: ARGS, viewport: { width: 1280, height: 900 },
  });
  const page = context.pages()[0] || await context.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error" && !m.text().includes("Failed to load resource")) problems.push(m.text()); });
  await page.goto(url);
  await page.getByTestId("start").click();
  await rateRound(page, 0, [5, 4, null, 2]);
  await rateRound(page, 1, [5, 5, 1, 3]);
  await waitForRound(page, 2);
  await page.waitForSelector("#history li:nth-child(2) img", { timeout: WAIT_MS });
  const token = await page.evaluate(() => localStorage.getItem("apa-session-token"));
  say({ event: "rated", token, ...(await pageState(page)) });

  await nextLine();  // the server is restarted meanwhile
  await page.reload();
  await waitForRound(page, 2);
  const reloaded = await pageState(page);
  const fresh = await context.newPage();  // a new tab on the bare address finds the session in localStorage
  await fresh.goto(url);
  await waitForRound(fresh, 2);
  const newTab = await pageState(fresh);
  await fresh.close();
  await page.getByTestId("rate-0-4").click();  // a choice in progress, for the screenshot
  await page.waitForFunction(() => [...document.querySelectorAll("#cards img, #history img")].every((i) => i.complete && i.naturalWidth > 0));
  await page.screenshot({ path: env("APA_E2E_SCREENSHOT"), fullPage: true });
  say({ event: "resumed", reloaded, newTab, problems });
  await context.close();
  lines.close();
}

main().catch((e) => {
  say({ event: "failed", error: String(e && e.stack || e) });
  process.exit(1);
});
