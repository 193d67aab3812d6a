// The rating page of `apa serve`: start or resume a session, rate each round, watch the next one arrive.
// The session token lives in the URL fragment (#s=TOKEN) and in localStorage; it never leaves this
// browser except in requests to this server. Ratings chosen but not sent yet, and a submission the
// server has not stored yet, are kept in localStorage too: a reload or a server restart loses neither.
"use strict";

const STORAGE_KEY = "apa-session-token";
const TOKEN_RE = /^[A-Za-z0-9_-]{43}$/;
const BUSY_TEXT = {
  queued: "Waiting for a free generator…",
  fitting: "Learning from your ratings…",
  sampling: "Generating round {round}…",
  final: "Generating samples from your aligned model…",
};
const POLL_MS = 700;
const OFFLINE_POLL_MS = 1500;
const RETRY_MS = [1000, 2000, 4000, 8000, 15000];  // waits between tries of a submission; the last repeats

let token = null;
let shownRound = null;  // the round whose cards are on the page
let choices = [];       // per image: 1..5, null (skip) or undefined (not chosen yet)
let locked = [];        // per image: true when the server already holds its rating
let focusIndex = 0;     // the card the keys rate
let pending = null;     // {round, ratings}: a submission the server has not stored yet
let attempt = 0;        // failed tries of the pending submission
let retryTimer = null;
let pollTimer = null;
let lastState = null;

const $ = (id) => document.getElementById(id);
const draftKey = (round) => `apa-draft:${token}:${round}`;
const pendingKey = () => `apa-pending:${token}`;

// ------------------------------------------------------------------ token and what this browser keeps

function tokenFromPage() {
  const m = location.hash.match(/^#s=([A-Za-z0-9_-]{43})$/);
  if (m) return m[1];
  const saved = localStorage.getItem(STORAGE_KEY);
  return saved && TOKEN_RE.test(saved) ? saved : null;
}

function remember(t) {
  token = t;
  localStorage.setItem(STORAGE_KEY, t);
  history.replaceState(null, "", "#s=" + t);
  const link = location.origin + location.pathname + "#s=" + t;
  $("session-link").href = link;
  $("session-link").textContent = link;
  pending = readJSON(pendingKey());
  attempt = 0;
}

function forget() {
  token = null;
  shownRound = null;
  pending = null;
  clearTimeout(retryTimer);
  localStorage.removeItem(STORAGE_KEY);
  history.replaceState(null, "", location.pathname);
}

function readJSON(key) {
  try { return JSON.parse(localStorage.getItem(key)); } catch (e) { return null; }
}

function saveDraft() {
  const draft = {};
  choices.forEach((c, p) => { if (c !== undefined && !locked[p]) draft[p] = c; });
  if (Object.keys(draft).length) localStorage.setItem(draftKey(shownRound), JSON.stringify(draft));
  else localStorage.removeItem(draftKey(shownRound));
}

function setPending(value) {
  pending = value;
  if (value) localStorage.setItem(pendingKey(), JSON.stringify(value));
  else localStorage.removeItem(pendingKey());
}

// ------------------------------------------------------------------ server

async function api(method, path, body) {
  const options = { method, headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    const err = new Error("The server is not answering; retrying…");
    err.offline = true;
    throw err;
  }
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    const err = new Error((data && data.error) || `the server answered ${response.status}`);
    err.status = response.status;
    // busy (another process writes the session) or the sessions' database unreachable: the same request
    // may succeed after this many seconds
    err.retryAfter = Number(response.headers.get("Retry-After")) || 0;
    throw err;
  }
  return data;
}

const sessionPath = (suffix = "") => `/api/sessions/${encodeURIComponent(token)}${suffix}`;

// ------------------------------------------------------------------ views

function show(view) {
  for (const id of ["start-view", "busy-view", "round-view", "done-view"]) $(id).hidden = id !== view;
  $("panel").hidden = view === "start-view";
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function showSending(kind, text) {
  document.body.dataset.sending = kind;
  $("send-status").textContent = text;
  $("send-status").hidden = !text;
  $("send-status").className = kind === "retrying" ? "note" : "muted";
}

// Rounds still to come if every image is rated (a skip costs nothing, so it can add a round).
function roundsPlanned(state) {
  const left = Math.max(0, state.budget - state.spent);
  return state.round + Math.max(1, Math.ceil(left / state.per_round));
}

function renderPanel(state) {
  for (const id of ["spent", "bar-spent"]) $(id).textContent = state.spent;
  for (const id of ["budget", "bar-budget"]) $(id).textContent = state.budget;
  for (const id of ["spent-fill", "bar-fill"]) $(id).style.width = `${Math.min(100, (100 * state.spent) / state.budget)}%`;
  $("taste-changed").hidden = state.phase !== "ready";
  const changed = state.taste_changed_at;
  $("taste-note").hidden = !changed;
  $("taste-note").textContent = changed ? `Learning from round ${changed} on; earlier rounds are forgotten.` : "";
  const rated = state.history.filter((h) => h.status === "complete");
  $("history-empty").hidden = rated.length > 0;
  const list = $("history");
  if (list.dataset.count === String(rated.length)) return;
  list.replaceChildren(...rated.map(historyItem));
  list.dataset.count = String(rated.length);
}

const ratingText = (r) => (r === null ? "skip" : r === "pending" ? "…" : String(r));

function historyItem(h) {
  const li = document.createElement("li");
  li.dataset.round = h.round;
  const title = document.createElement("strong");
  title.textContent = `Round ${h.round + 1}`;
  const row = document.createElement("div");
  row.className = "thumbs";
  h.ratings.forEach((r, p) => {
    const fig = document.createElement("figure");
    fig.className = r === null ? "skipped" : `r${r}`;
    const img = document.createElement("img");
    img.src = sessionPath(`/rounds/${h.round}/images/${p}.png`);
    img.alt = `image ${p + 1} of round ${h.round + 1}, rated ${ratingText(r)}`;
    const cap = document.createElement("figcaption");
    cap.textContent = ratingText(r);
    fig.append(img, cap);
    row.append(fig);
  });
  li.append(title, row);
  return li;
}

function renderBusy(state) {
  show("busy-view");
  const round = (state.round ?? state.history.length) + 1;
  $("busy-text").textContent = BUSY_TEXT[state.phase].replace("{round}", round);
  const { elapsed, estimate } = state.progress;
  const fill = $("busy-fill");
  fill.classList.toggle("indeterminate", !estimate);
  fill.style.width = estimate ? `${Math.min(95, (100 * elapsed) / estimate)}%` : "";
  $("busy-time").textContent = estimate
    ? `${elapsed.toFixed(0)} s of about ${estimate.toFixed(0)} s (last time)` : `${elapsed.toFixed(0)} s`;
}

function renderRound(state) {
  show("round-view");
  $("round-title").textContent = `Round ${state.round + 1} of ${roundsPlanned(state)}`;
  if (shownRound === state.round) return;  // keep the choices the person is making
  shownRound = state.round;
  const draft = readJSON(draftKey(state.round)) || {};
  const sent = pending && pending.round === state.round ? pending.ratings : null;
  choices = Array.from({ length: state.images }, (_, p) => {
    if (String(p) in state.rated) return state.rated[p];
    if (sent) return sent[p];
    return String(p) in draft && (draft[p] === null || state.choices.includes(draft[p])) ? draft[p] : undefined;
  });
  locked = Array.from({ length: state.images }, (_, p) => String(p) in state.rated);
  $("cards").replaceChildren(...choices.map((_, p) => card(state, p)));
  focusIndex = Math.max(0, choices.findIndex((c) => c === undefined));
  updateChoices();
}

function card(state, p) {
  const div = document.createElement("div");
  div.className = "card";
  div.id = `card-${p}`;
  div.tabIndex = 0;
  div.dataset.testid = `card-${p}`;
  div.setAttribute("aria-label", `image ${p + 1}: press 1 to 5 to rate it, 0 or S to skip it`);
  div.addEventListener("focus", () => { focusIndex = p; markFocus(); });
  const img = document.createElement("img");
  img.src = sessionPath(`/rounds/${state.round}/images/${p}.png`);
  img.alt = `image ${p + 1} of round ${state.round + 1}`;
  const row = document.createElement("div");
  row.className = "choices";
  for (const v of [...state.choices, null]) row.append(choiceButton(p, v));
  div.append(img, row);
  return div;
}

function choiceButton(p, v) {
  const b = document.createElement("button");
  b.type = "button";
  b.tabIndex = -1;  // Tab moves between cards; the keys rate
  b.textContent = v === null ? "skip" : String(v);
  b.className = v === null ? "skip" : "";
  b.dataset.testid = v === null ? `skip-${p}` : `rate-${p}-${v}`;
  b.dataset.value = v === null ? "skip" : String(v);
  b.addEventListener("click", () => choose(p, v, false));
  return b;
}

function choose(p, v, advance) {
  if (locked[p] || pending) return;
  choices[p] = v;
  saveDraft();
  if (advance && p + 1 < choices.length) focusCard(p + 1);
  else { focusIndex = p; }
  updateChoices();
}

function focusCard(p) {
  focusIndex = Math.max(0, Math.min(choices.length - 1, p));
  const div = $(`card-${focusIndex}`);
  if (div) div.focus({ preventScroll: false });
  markFocus();
}

function markFocus() {
  choices.forEach((_, p) => $(`card-${p}`).classList.toggle("focused", p === focusIndex));
}

function updateChoices() {
  choices.forEach((c, p) => {
    const cardDiv = $(`card-${p}`);
    cardDiv.classList.toggle("rated", c !== undefined);
    for (const b of cardDiv.querySelectorAll("button")) {
      const value = b.dataset.value === "skip" ? null : Number(b.dataset.value);
      b.setAttribute("aria-pressed", String(c !== undefined && c === value));
      b.disabled = locked[p] || Boolean(pending);
    }
  });
  markFocus();
  const missing = choices.filter((c) => c === undefined).length;
  $("submit").disabled = missing > 0 || Boolean(pending);
  $("submit-hint").textContent = pending ? "" : missing ? `${missing} image${missing > 1 ? "s" : ""} left to rate or skip` : "All chosen: submit them";
}

function columns() {
  const cards = [...$("cards").children];
  if (!cards.length) return 1;
  const top = cards[0].offsetTop;
  return Math.max(1, cards.filter((c) => c.offsetTop === top).length);
}

function onKey(e) {
  if (document.body.dataset.phase !== "ready" || e.altKey || e.ctrlKey || e.metaKey) return;
  if (e.target instanceof HTMLElement && e.target.closest("input, textarea, select, a, aside, #retry")) return;
  const key = e.key.toLowerCase();
  const state = lastState;
  let handled = true;
  if (state && /^[1-9]$/.test(key) && state.choices.includes(Number(key))) choose(focusIndex, Number(key), true);
  else if (key === "0" || key === "s") choose(focusIndex, null, true);
  else if (key === "arrowright") focusCard(focusIndex + 1);
  else if (key === "arrowleft") focusCard(focusIndex - 1);
  else if (key === "arrowdown") focusCard(focusIndex + columns());
  else if (key === "arrowup") focusCard(focusIndex - columns());
  else if (key === "enter") { if (!$("submit").disabled) submitRatings(); }
  else handled = false;
  if (handled) e.preventDefault();
}

function renderDone(state) {
  show("done-view");
  $("done-text").textContent = `All ${state.budget} ratings are in. ${state.message || ""}`;
  if (state.final) $("final-image").src = sessionPath("/final.png");
  $("final-image").hidden = !state.final;
  $("downloads").hidden = !state.final;
  $("download-zip").href = sessionPath("/final.zip");
  $("download-grid").href = sessionPath("/final.png");
  $("report-link").hidden = !state.report;
  $("report-link").href = sessionPath("/report/report.html");
}

function render(state) {
  lastState = state;
  document.body.dataset.phase = state.phase;
  document.body.dataset.round = state.round === null ? "" : String(state.round);
  document.body.dataset.spent = String(state.spent);
  renderPanel(state);
  $("retry").hidden = state.phase !== "error";
  if (state.phase === "error") { show(null); $("panel").hidden = false; showError(state.message); return; }
  if (state.phase === "ready") renderRound(state);
  else if (state.phase === "done") renderDone(state);
  else renderBusy(state);
}

// ------------------------------------------------------------------ flow

function schedulePoll(ms) {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(refresh, ms);
}

async function refresh() {
  if (!token) return;
  try {
    const state = await api("GET", sessionPath());
    showError("");
    render(state);
    if (pending) { sendPending(); return; }  // a submission from before a reload or an outage
    if (!["ready", "done", "error"].includes(state.phase)) schedulePoll(POLL_MS);
  } catch (e) {
    if (e.status === 404) {
      forget();
      startView("That session was not found on this server; start a new one.");
    } else {
      showError(e.message);
      schedulePoll(e.offline ? OFFLINE_POLL_MS : e.retryAfter ? e.retryAfter * 1000 : POLL_MS * 3);
    }
  }
}

function submitRatings() {
  if (pending || shownRound === null || choices.some((c) => c === undefined)) return;
  setPending({ round: shownRound, ratings: choices.slice() });
  attempt = 0;
  sendPending();
}

// Whether the server holds every rating of `round` (a submission whose answer was lost may be stored).
function stored(state, round) {
  const h = state.history.find((x) => x.round === round);
  return Boolean(h) && !h.ratings.includes("pending");
}

async function sendPending() {
  clearTimeout(retryTimer);
  clearTimeout(pollTimer);
  if (!pending) return;
  const { round, ratings } = pending;
  updateChoices();
  showSending("sending", attempt ? `Sending your ratings again (try ${attempt + 1})…` : "Sending your ratings…");
  try {
    const state = await api("POST", sessionPath(`/rounds/${round}/ratings`), { ratings });
    done(round, state);
  } catch (e) {
    if (e.offline || e.status >= 500 || e.retryAfter) {
      const wait = e.retryAfter ? e.retryAfter * 1000 : RETRY_MS[Math.min(attempt, RETRY_MS.length - 1)];
      attempt += 1;
      const why = e.retryAfter ? `The server asks to wait (${e.message}).` : "The server is not answering.";
      showSending("retrying", `${why} Your ratings are kept in this browser and will be ` +
        `sent again in ${Math.round(wait / 1000)} s (try ${attempt + 1}); you can also leave this page and come back.`);
      retryTimer = setTimeout(sendPending, wait);
      return;
    }
    let state = null;
    try { state = await api("GET", sessionPath()); } catch (err) { state = null; }
    if (e.status === 409 && state && stored(state, round)) { done(round, state); return; }
    setPending(null);
    showSending("", "");
    showError(`Your ratings were not stored: ${e.message}`);
    if (state) { shownRound = null; render(state); schedulePoll(POLL_MS); } else updateChoices();
  }
}

function done(round, state) {
  setPending(null);
  localStorage.removeItem(draftKey(round));
  attempt = 0;
  showSending("", "");
  showError("");
  render(state);
  schedulePoll(POLL_MS);
}

const MAX_GIVEN = 16;  // the server's limit on images a session starts from

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`${file.name} could not be read`));
    reader.readAsDataURL(file);
  });
}

const GIVEN_SIDE = 256;  // a given image's shorter side is scaled down to this before it is sent

async function scaledDown(dataURL) {  // a PNG data URL of the image, its shorter side at most GIVEN_SIDE
  const img = new Image();
  await new Promise((resolve, reject) => {
    img.onload = resolve;
    img.onerror = () => reject(new Error("One of the chosen files is not an image this browser can read."));
    img.src = dataURL;
  });
  const scale = Math.min(1, GIVEN_SIDE / Math.min(img.naturalWidth, img.naturalHeight));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
  canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
  canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/png");
}

async function givenImages() {  // the chosen files as PNG data URLs; undefined when none were chosen
  const files = Array.from($("given").files || []);
  if (files.length === 0) return undefined;
  if (files.length > MAX_GIVEN) throw new Error(`Choose at most ${MAX_GIVEN} images.`);
  const urls = await Promise.all(files.map(readAsDataURL));
  return { examples: await Promise.all(urls.map(scaledDown)) };
}

async function startSession(tries = 0) {
  $("start-button").disabled = true;
  try {
    const { token: t } = await api("POST", "/api/sessions", await givenImages());
    remember(t);
    shownRound = null;
    refresh();
  } catch (e) {
    showError(e.message);
    if (e.retryAfter && tries < 10) {  // the database is down for a moment: try again, as a person would
      setTimeout(() => startSession(tries + 1), e.retryAfter * 1000);
      return;
    }
  }
  $("start-button").disabled = false;
}

function startView(note) {
  clearTimeout(pollTimer);
  document.body.dataset.phase = "start";
  show("start-view");
  $("start-note").textContent = note || "";
  $("start-note").hidden = !note;
}

async function tasteChanged() {
  if (!confirm("Your taste changed? From this round on the model learns only from what you rate now; " +
               "your earlier ratings are forgotten.")) return;
  try { render(await api("POST", sessionPath("/taste-changed"))); } catch (e) { showError(e.message); }
}

async function retry() {
  try { render(await api("POST", sessionPath("/retry"))); schedulePoll(POLL_MS); } catch (e) { showError(e.message); }
}

function init() {
  $("start-button").addEventListener("click", () => startSession());
  $("given").addEventListener("change", () => {
    const n = ($("given").files || []).length;
    $("given-note").textContent = n ? `${n} image${n === 1 ? "" : "s"} chosen` : "";
  });
  $("submit").addEventListener("click", submitRatings);
  $("retry").addEventListener("click", retry);
  $("taste-changed").addEventListener("click", tasteChanged);
  document.addEventListener("keydown", onKey);
  $("new-session").addEventListener("click", () => {
    if (!confirm("Start another session? To come back to this one later, keep its link first.")) return;
    forget();
    showError("");
    startView();
  });
  window.addEventListener("hashchange", () => { const t = tokenFromPage(); if (t && t !== token) { remember(t); shownRound = null; refresh(); } });
  showSending("", "");
  const t = tokenFromPage();
  if (t) { remember(t); refresh(); } else startView();
}

document.addEventListener("DOMContentLoaded", init);
