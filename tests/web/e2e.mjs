// Drives the `apa serve` page in Debian's chromium for tests/web/test_browser.py.
//
// Environment: APA_E2E_URL (the server), APA_E2E_CHROMIUM (the browser binary), APA_E2E_PROFILE (a fresh
// user-data directory), APA_E2E_SHOTS (a folder for the screenshots).
// Protocol on stdout: one JSON object per line, {"event": ...}. After "submitting" the test stops the
// server and answers one line; after "retrying" and after "rated" it (re)starts the server and answers one line.
import { createInterface } from "node:readline";
import { join } from "node:path";
import { chromium } from "playwright-core";

const WAIT_MS = 240_000;
// a 40×40 grey PNG, a white bar on black: the image a person gives to start a session
const GIVEN_PNG = "iVBORw0KGgoAAAANSUhEUgAAACgAAAAoCAAAAACpleexAAAAJElEQVR4nGNgGAXUAIzoAv9xSDARa+KowlGFowoHWuEooA4AAK4jATCc8+nBAAAAAElFTkSuQmCC";
const DESKTOP = { width: 1280, height: 900 };
const MOBILE = { width: 390, height: 844 };
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

async function click(page, values) {
  for (const [p, v] of values.entries()) {
    if (v !== undefined) await page.getByTestId(v === null ? `skip-${p}` : `rate-${p}-${v}`).click();
  }
}

async function rateRound(page, round, values) {
  await waitForRound(page, round);
  await click(page, values);
  await page.getByTestId("submit").click();
}

// The value pressed on each card: a number, "skip", or null when none is chosen.
async function pressed(page) {
  return page.evaluate(() => [...document.querySelectorAll("#cards .card")].map((c) => {
    const b = c.querySelector('button[aria-pressed="true"]');
    return b ? (b.dataset.value === "skip" ? "skip" : Number(b.dataset.value)) : null;
  }));
}

async function pageState(page) {
  return page.evaluate(() => ({
    phase: document.body.dataset.phase,
    round: Number(document.body.dataset.round),
    spent: Number(document.getElementById("spent").textContent),
    history: document.querySelectorAll("#history li").length,
    images: document.querySelectorAll("#cards .card img").length,
    title: document.getElementById("round-title").textContent,
    hash: location.hash,
  }));
}

async function imagesLoaded(page, selector) {
  await page.waitForFunction((sel) => [...document.querySelectorAll(sel)]
    .filter((i) => i.getClientRects().length > 0)  // images on show (not inside a hidden view)
    .every((i) => i.complete && i.naturalWidth > 0),
    selector, { timeout: WAIT_MS });
}

// Screenshots at both widths: `target` is the page (full page; what is in view at 390 px when `inView`)
// or a selector (that element only).
async function shots(page, name, target, inView = false) {
  const dir = env("APA_E2E_SHOTS");
  const saved = [];
  for (const [width, size] of [["1280", DESKTOP], ["390", MOBILE]]) {
    await page.setViewportSize(size);
    await imagesLoaded(page, "img");
    const path = join(dir, `${name}-${width}.png`);
    if (target) await page.locator(target).screenshot({ path });
    else await page.screenshot({ path, fullPage: !(inView && size === MOBILE) });
    saved.push(path);
  }
  await page.setViewportSize(DESKTOP);
  return saved;
}

// Where the Submit button sits on a small screen: inside the viewport while the cards are scrolled to the top.
async function submitVisibleOnMobile(page) {
  await page.setViewportSize(MOBILE);
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.locator("#cards").scrollIntoViewIfNeeded();
  const box = await page.getByTestId("submit").boundingBox();
  await page.setViewportSize(DESKTOP);
  return box !== null && box.y >= 0 && box.y + box.height <= MOBILE.height;
}

async function main() {
  const url = env("APA_E2E_URL");
  const context = await chromium.launchPersistentContext(env("APA_E2E_PROFILE"), {
    executablePath: env("APA_E2E_CHROMIUM"), headless: true, args: ARGS, viewport: DESKTOP,
  });
  const page = context.pages()[0] || await context.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error" && !m.text().includes("Failed to load resource")) problems.push(m.text()); });
  await page.goto(url);
  await page.getByTestId("start").click();

  // Round 1: two choices survive a reload; the submission is held while the server is stopped.
  await waitForRound(page, 0);
  const firstTitle = (await pageState(page)).title;
  await click(page, [5, 4]);
  await page.reload();
  await waitForRound(page, 0);
  const draft = await pressed(page);
  let held = false;
  await page.route("**/rounds/0/ratings", async (route) => {
    if (held) return route.continue();
    held = true;
    say({ event: "submitting" });
    await nextLine();  // the server is stopped meanwhile
    try { await route.continue(); } catch (e) { /* the request failed: the server is gone */ }
  });
  await click(page, [undefined, undefined, null, 2]);
  await page.getByTestId("submit").click();
  await page.waitForSelector('body[data-sending="retrying"]', { timeout: WAIT_MS });
  const retrying = { status: await page.getByTestId("send-status").textContent(), kept: await pressed(page) };
  await page.screenshot({ path: join(env("APA_E2E_SHOTS"), "retrying-1280.png"), fullPage: true });
  say({ event: "retrying" });
  await nextLine();  // the server is started again
  await waitForRound(page, 1);
  await page.unroute("**/rounds/0/ratings");

  // Round 2: the keys alone. 5, skip, 4, 3 (as many as there are images); back one with the arrow key and
  // rate it 2; Enter submits. (A round shows fewer than 4 images when its particles coincide.)
  const n = await page.locator("#cards .card").count();
  const keys = ["5", "s", "4", "3"].slice(0, n);
  const expectedKeys = [5, "skip", 4, 3].slice(0, n);
  if (n >= 2) { keys.push("ArrowLeft", "2"); expectedKeys[n - 2] = 2; }
  await page.locator("#card-0").focus();
  for (const key of keys) await page.keyboard.press(key);
  const keyed = await pressed(page);
  const roundShots = await shots(page, "round", null, true);
  const mobileSubmit = await submitVisibleOnMobile(page);
  await page.keyboard.press("Enter");
  await waitForRound(page, 2);
  await page.waitForSelector("#history li:nth-child(2) img", { timeout: WAIT_MS });
  const historyShots = await shots(page, "history", "#panel");
  const token = await page.evaluate(() => localStorage.getItem("apa-session-token"));
  say({ event: "rated", token, draft, retrying, keyed, expectedKeys, firstTitle, mobileSubmit, ...(await pageState(page)) });

  await nextLine();  // the server is restarted meanwhile
  await page.reload();
  await waitForRound(page, 2);
  const reloaded = await pageState(page);
  const fresh = await context.newPage();  // a new tab on the bare address finds the session in localStorage
  await fresh.goto(url);
  await waitForRound(fresh, 2);
  const newTab = await pageState(fresh);
  await fresh.close();

  // The rest of the budget (a round shows fewer images when its particles coincide), then the finished page and its report.
  for (let round = 2; ; round += 1) {  // the last rounds show as many images as the budget has left
    await page.waitForSelector(`body[data-phase="done"], body[data-phase="ready"][data-round="${round}"]`, { timeout: WAIT_MS });
    if (await page.evaluate(() => document.body.dataset.phase === "done")) break;
    const n = await page.locator("#cards .card").count();
    await rateRound(page, round, Array(n).fill(5));
  }
  await page.waitForSelector('[data-testid="report-link"]:not([hidden])', { timeout: WAIT_MS });
  const doneShots = await shots(page, "finished");
  const [report] = await Promise.all([context.waitForEvent("page"), page.getByTestId("report-link").click()]);
  await report.waitForLoadState("load");
  await imagesLoaded(report, "img");
  const reportPage = await report.evaluate(() => ({
    url: location.pathname, heading: document.querySelector("h1")?.textContent,
    images: document.querySelectorAll("img").length, text: document.body.innerText.slice(0, 4000),
  }));
  await report.screenshot({ path: join(env("APA_E2E_SHOTS"), "report-1280.png"), fullPage: true });
  const downloads = await page.evaluate(async () => Promise.all(["download-zip", "download-grid"].map(async (id) => {
    const a = document.getElementById(id);
    const r = await fetch(a.href);
    return { id, status: r.status, type: r.headers.get("content-type"), bytes: (await r.arrayBuffer()).byteLength };
  })));
  // Another session, started from an image the person gives: it is round 0, rated liked, and round 1 is
  // the first the page shows.
  page.once("dialog", (d) => d.accept());
  await page.locator("#new-session").click();
  await page.getByTestId("given").setInputFiles({ name: "mine.png", mimeType: "image/png",
    buffer: Buffer.from(GIVEN_PNG, "base64") });
  await page.getByTestId("start").click();
  await waitForRound(page, 1);
  const given = { ...(await pageState(page)),
    token: await page.evaluate(() => localStorage.getItem("apa-session-token")) };
  say({ event: "finished", reloaded, newTab, problems, reportPage, downloads, given,
    shots: [...roundShots, ...historyShots, ...doneShots] });
  await context.close();
  lines.close();
}

main().catch((e) => {
  say({ event: "failed", error: String(e && e.stack || e) });
  process.exit(1);
});
