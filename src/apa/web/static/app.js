// The rating page of `apa serve`: start or resume a session, rate each round, watch the next one arrive.
// The session token lives in the URL fragment (#s=TOKEN) and in localStorage; it never leaves this
// browser except in requests to this server.
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

let token = null;
let shownRound = null;  // the round whose cards are on the page
let choices = [];       // per image: 1..5, null (skip) or undefined (not chosen yet)
let locked = [];        // per image: true when the server already holds its rating
let pollTimer = null;

const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ token

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
}

function forget() {
  token = null;
  shownRound = null;
  localStorage.removeItem(STORAGE_KEY);
  history.replaceState(null, "", location.pathname);
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

function renderPanel(state) {
  $("spent").textContent = state.spent;
  $("budget").textContent = state.budget;
  $("spent-fill").style.width = `${Math.min(100, (100 * state.spent) / state.budget)}%`;
  const rated = state.history.filter((h) => h.status === "complete");
  $("history-empty").hidden = rated.length > 0;
  const list = $("history");
  if (list.dataset.count === String(rated.length)) return;
  list.replaceChildren(...rated.map(historyItem));
  list.dataset.count = String(rated.length);
}

function historyItem(h) {
  const li = document.createElement("li");
  li.dataset.round = h.round;
  const title = document.createElement("strong");
  title.textContent = `Round ${h.round}`;
  const img = document.createElement("img");
  img.src = sessionPath(`/rounds/${h.round}/grid.png`);
  img.alt = `the ${h.images} images of round ${h.round}`;
  const ratings = document.createElement("div");
  ratings.className = "ratings";
  ratings.textContent = "ratings: " + h.ratings.map((r) => (r === null ? "skip" : r)).join(" · ");
  li.append(title, img, ratings);
  return li;
}

function renderBusy(state) {
  show("busy-view");
  $("busy-text").textContent = BUSY_TEXT[state.phase].replace("{round}", state.round ?? state.history.length);
  const { elapsed, estimate } = state.progress;
  const fill = $("busy-fill");
  fill.classList.toggle("indeterminate", !estimate);
  fill.style.width = estimate ? `${Math.min(95, (100 * elapsed) / estimate)}%` : "";
  $("busy-time").textContent = estimate
    ? `${elapsed.toFixed(0)} s of about ${estimate.toFixed(0)} s (last time)` : `${elapsed.toFixed(0)} s`;
}

function renderRound(state) {
  show("round-view");
  if (shownRound === state.round) return;  // keep the choices the person is making
  shownRound = state.round;
  choices = Array.from({ length: state.images }, (_, p) => (String(p) in state.rated ? state.rated[p] : undefined));
  locked = choices.map((c) => c !== undefined);
  $("round-title").textContent = `Round ${state.round}`;
  $("cards").replaceChildren(...choices.map((_, p) => card(state, p)));
  updateChoices();
}

function card(state, p) {
  const div = document.createElement("div");
  div.className = "card";
  div.id = `card-${p}`;
  const img = document.createElement("img");
  img.src = sessionPath(`/rounds/${state.round}/images/${p}.png`);
  img.alt = `image ${p + 1} of round ${state.round}`;
  const row = document.createElement("div");
  row.className = "choices";
  for (const v of [...state.choices, null]) row.append(choiceButton(p, v));
  div.append(img, row);
  return div;
}

function choiceButton(p, v) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = v === null ? "skip" : String(v);
  b.className = v === null ? "skip" : "";
  b.dataset.testid = v === null ? `skip-${p}` : `rate-${p}-${v}`;
  b.dataset.value = v === null ? "skip" : String(v);
  b.addEventListener("click", () => { if (!locked[p]) { choices[p] = v; updateChoices(); } });
  return b;
}

function updateChoices() {
  choices.forEach((c, p) => {
    const cardDiv = $(`card-${p}`);
    cardDiv.classList.toggle("rated", c !== undefined);
    for (const b of cardDiv.querySelectorAll("button")) {
      const value = b.dataset.value === "skip" ? null : Number(b.dataset.value);
      b.setAttribute("aria-pressed", String(c !== undefined && c === value));
      b.disabled = locked[p];
    }
  });
  const missing = choices.filter((c) => c === undefined).length;
  $("submit").disabled = missing > 0;
  $("submit-hint").textContent = missing ? `${missing} image${missing > 1 ? "s" : ""} left to rate or skip` : "";
}

function renderDone(state) {
  show("done-view");
  $("done-text").textContent = `All ${state.budget} ratings are in. ${state.message || ""}`;
  if (state.final) $("final-image").src = sessionPath("/final.png");
  $("final-image").hidden = !state.final;
}

function render(state) {
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
    if (!["ready", "done", "error"].includes(state.phase)) schedulePoll(POLL_MS);
  } catch (e) {
    if (e.status === 404) {
      forget();
      startView("That session was not found on this server; start a new one.");
    } else {
      showError(e.message);
      schedulePoll(e.offline ? OFFLINE_POLL_MS : POLL_MS * 3);
    }
  }
}

async function submitRatings() {
  $("submit").disabled = true;
  try {
    const state = await api("POST", sessionPath(`/rounds/${shownRound}/ratings`), { ratings: choices });
    showError("");
    render(state);
    schedulePoll(POLL_MS);
  } catch (e) {
    showError(e.message);
    if (e.status === 409 || e.offline) { shownRound = null; schedulePoll(POLL_MS); }
    else updateChoices();
  }
}

async function startSession() {
  $("start-button").disabled = true;
  try {
    const { token: t } = await api("POST", "/api/sessions");
    remember(t);
    shownRound = null;
    refresh();
  } catch (e) {
    showError(e.message);
  } finally {
    $("start-button").disabled = false;
  }
}

function startView(note) {
  clearTimeout(pollTimer);
  document.body.dataset.phase = "start";
  show("start-view");
  $("start-note").textContent = note || "";
  $("start-note").hidden = !note;
}

async function retry() {
  try { render(await api("POST", sessionPath("/retry"))); schedulePoll(POLL_MS); } catch (e) { showError(e.message); }
}

function init() {
  $("start-button").addEventListener("click", startSession);
  $("submit").addEventListener("click", submitRatings);
  $("retry").addEventListener("click", retry);
  $("new-session").addEventListener("click", () => {
    if (!confirm("Start another session? To come back to this one later, keep its link first.")) return;
    forget();
    showError("");
    startView();
  });
  window.addEventListener("hashchange", () => { const t = tokenFromPage(); if (t && t !== token) { remember(t); shownRound = null; refresh(); } });
  const t = tokenFromPage();
  if (t) { remember(t); refresh(); } else startView();
}

document.addEventListener("DOMContentLoaded", init);
