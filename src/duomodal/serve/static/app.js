// duomodal web page: text / image / "more like this" search, and generation with progress.
// No framework and nothing loaded from elsewhere; talks only to this server's /api.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 300;
let health = null;
let searchSerial = 0; // only the newest search may draw its results

function show(element, visible) { element.hidden = !visible; }

function setError(id, message) {
  const element = $(id);
  element.textContent = message || "";
  show(element, Boolean(message));
}

async function apiError(response) {
  try {
    const body = await response.json();
    if (body && typeof body.detail === "string") return body.detail;
  } catch (e) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function fetchJSON(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (e) {
    throw new Error("the server can't be reached: is `duomodal serve` still running?");
  }
  if (!response.ok) throw new Error(await apiError(response));
  return response.json();
}

function baseName(path) {
  const parts = String(path).split(/[\\/]/);
  return parts[parts.length - 1];
}

// --- tabs ------------------------------------------------------------------------------------

function selectTab(name) {
  for (const tab of ["search", "generate"]) {
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === name));
    show($(`panel-${tab}`), tab === name);
  }
  (name === "search" ? $("query") : $("prompt")).focus();
}

// --- search ----------------------------------------------------------------------------------

function resultCard(hit) {
  const figure = document.createElement("figure");
  figure.className = "card";
  figure.tabIndex = 0;
  figure.dataset.id = hit.id;
  const tip = `score ${hit.score.toFixed(3)} · ${hit.path}` + (hit.caption ? `\n${hit.caption}` : "");
  figure.title = tip;
  const img = document.createElement("img");
  img.src = hit.thumb_url;
  img.alt = hit.caption || baseName(hit.path);
  img.loading = "lazy";
  img.title = tip;
  const caption = document.createElement("figcaption");
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = baseName(hit.path);
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  caption.append(name, score);
  figure.append(img, caption);
  const similar = () => searchSimilar(hit);
  figure.addEventListener("click", similar);
  figure.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); similar(); }
  });
  return figure;
}

function showQueryCard(imageUrl, text) {
  const card = $("search-query");
  if (!imageUrl) { show(card, false); return; }
  $("search-query-image").src = imageUrl;
  $("search-query-text").textContent = text;
  show(card, true);
}

async function runSearch(describe, request) {
  const serial = ++searchSerial;
  setError("search-error", "");
  $("search-info").textContent = "Searching…";
  try {
    const body = await request();
    if (serial !== searchSerial) return;
    const grid = $("results");
    grid.replaceChildren(...body.results.map(resultCard));
    const n = body.results.length;
    $("search-info").textContent =
      `${n} result${n === 1 ? "" : "s"} for ${describe} · ${body.took_ms.toFixed(1)} ms`;
  } catch (e) {
    if (serial !== searchSerial) return;
    $("search-info").textContent = "";
    setError("search-error", e.message);
  }
}

function searchText(query) {
  const k = Number($("k").value);
  showQueryCard(null);
  history.replaceState(null, "", `#q=${encodeURIComponent(query)}`);
  return runSearch(`“${query}”`, () => fetchJSON("/api/search", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ query, k }),
  }));
}

function searchSimilar(hit) {
  const k = Number($("k").value);
  showQueryCard(hit.thumb_url, `More like ${baseName(hit.path)}`);
  history.replaceState(null, "", `#similar=${hit.id}`);
  window.scrollTo({ top: 0, behavior: "smooth" });
  return runSearch(`image ${baseName(hit.path)}`,
    () => fetchJSON(`/api/similar/${hit.id}?k=${k}`));
}

function searchImage(file) {
  if (!file) return;
  if (health && file.size > health.max_upload_bytes) {
    setError("search-error", `${file.name} is ${(file.size / 1048576).toFixed(1)} MB; ` +
      `the upload limit is ${(health.max_upload_bytes / 1048576).toFixed(1)} MB`);
    return;
  }
  selectTab("search");
  showQueryCard(URL.createObjectURL(file), `Images like ${file.name}`);
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("k", $("k").value);
  return runSearch(file.name, () => fetchJSON("/api/search/image", { method: "POST", body: form }));
}

function setUpDrop() {
  const overlay = $("drop-overlay");
  let depth = 0;
  const hasFiles = (event) => Array.from(event.dataTransfer?.types || []).includes("Files");
  window.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    depth += 1;
    show(overlay, true);
  });
  window.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (depth === 0) show(overlay, false);
  });
  window.addEventListener("dragover", (event) => { if (hasFiles(event)) event.preventDefault(); });
  window.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    depth = 0;
    show(overlay, false);
    searchImage(event.dataTransfer.files[0]);
  });
}

// --- generate --------------------------------------------------------------------------------

function scoreLabel(image, kind) {
  if (image.score === null) return "not scored";
  return kind === "clip" ? `CLIP ${image.score.toFixed(3)}` : `fit ${image.score.toFixed(2)}`;
}

function generatedCard(image, prompt, kind) {
  const figure = document.createElement("figure");
  figure.className = "card";
  const img = document.createElement("img");
  img.src = image.url;
  img.alt = prompt;
  const score = scoreLabel(image, kind);
  figure.title = `#${image.index + 1} · ${score}`;
  const caption = document.createElement("figcaption");
  const rank = document.createElement("span");
  rank.className = "name";
  rank.textContent = `#${image.index + 1}`;
  const value = document.createElement("span");
  value.className = "score";
  value.textContent = score;
  caption.append(rank, value);
  figure.append(img, caption);
  return figure;
}

function showProgress(job) {
  show($("progress"), true);
  $("progress-bar").value = job.progress;
  const steps = job.total > 0 ? ` · ${job.done}/${job.total}` : "";
  const label = { queued: "Waiting for the generator", running: "Generating", done: "Done",
                  failed: "Failed" }[job.status];
  $("progress-text").textContent = `${label}${steps}`;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function generate(event) {
  event.preventDefault();
  const button = $("generate-button");
  setError("generate-error", "");
  const keep = $("keep").value === "" ? null : Number($("keep").value);
  const request = {
    prompt: $("prompt").value,
    num: Number($("num").value),
    keep,
    guidance: Number($("guidance").value),
    seed: Number($("seed").value),
  };
  button.disabled = true;
  $("generated").replaceChildren();
  try {
    let job = await fetchJSON("/api/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request),
    });
    showProgress(job);
    while (job.status === "queued" || job.status === "running") {
      await sleep(POLL_MS);
      job = await fetchJSON(job.url);
      showProgress(job);
    }
    if (job.status === "failed") throw new Error(job.error || "generation failed");
    $("generated").replaceChildren(
      ...job.result.images.map((image) => generatedCard(image, job.result.prompt, job.result.score_kind)));
  } catch (e) {
    setError("generate-error", e.message);
  } finally {
    button.disabled = false;
  }
}

// --- start -----------------------------------------------------------------------------------

async function start() {
  $("tab-search").addEventListener("click", () => selectTab("search"));
  $("tab-generate").addEventListener("click", () => selectTab("generate"));
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const query = $("query").value.trim();
    if (query) searchText(query);
  });
  $("file-input").addEventListener("change", (event) => {
    searchImage(event.target.files[0]);
    event.target.value = "";
  });
  $("generate-form").addEventListener("submit", generate);
  setUpDrop();
  try {
    health = await fetchJSON("/health");
    $("server-status").textContent = `${health.images.toLocaleString()} images indexed`;
    if (health.generation) {
      show($("tab-generate"), true);
      for (const id of ["num", "keep"]) $(id).max = String(health.max_generate);
    }
  } catch (e) {
    $("server-status").textContent = e.message;
  }
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("q")) {
    $("query").value = hash.get("q");
    searchText(hash.get("q"));
  } else if (hash.get("similar") && /^\d+$/.test(hash.get("similar"))) {
    const id = Number(hash.get("similar"));
    searchSimilar({ id, path: `image ${id}`, thumb_url: `/api/thumb/${id}` });
  }
}

document.addEventListener("DOMContentLoaded", start);
