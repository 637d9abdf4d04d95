// duomodal web page: text / image / "more like this" search, generation with live previews, and
// the shared job view. studio.js (edits, completions) and gallery.js build on this file.
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

const TABS = ["search", "generate", "studio", "gallery"];
const TAB_FOCUS = { search: "query", generate: "prompt", studio: "studio-prompt", gallery: "tab-gallery" };

function selectTab(name) {
  for (const tab of TABS) {
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === name));
    show($(`panel-${tab}`), tab === name);
  }
  $(TAB_FOCUS[name]).focus();
}

// --- search ----------------------------------------------------------------------------------

// In an index with words (--ocr): the words read in the image, the query's words among them in
// bold, and why it matched; the full words and reason in the tooltip.
function matchLine(hit) {
  const line = document.createElement("p");
  line.className = "match";
  const found = new Set(hit.match.matched_words);
  for (const word of (hit.words || "").split(/\s+/).filter(Boolean)) {
    const plain = word.toLowerCase().replace(/[^\p{L}\p{N}]/gu, "");
    const part = document.createElement([...found].some((w) => plain.includes(w)) ? "strong" : "span");
    part.textContent = word + " ";
    line.append(part);
  }
  if (!hit.words) line.textContent = "no words";
  line.title = `${hit.match.why}\nwords: ${hit.words || "(none)"}`;
  return line;
}

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
  if (hit.match) figure.append(matchLine(hit));
  if (health && health.generation) {
    const tools = document.createElement("div");
    tools.className = "card-tools";
    tools.append(iconButton("✎", "edit this image in the studio",
                            () => openInStudio(hit.image_url, { kind: "index", id: hit.id })));
    figure.append(tools);
  }
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

// The filter fields of the search form, as /api/search reads them (empty ones left out).
function searchFilters() {
  const filters = {};
  const text = { folder: "filter-folder", after: "filter-after", before: "filter-before",
                 min_size: "filter-min-size", max_size: "filter-max-size" };
  for (const [name, id] of Object.entries(text)) if ($(id).value.trim()) filters[name] = $(id).value.trim();
  if ($("filter-format").value) filters.format = [$("filter-format").value];
  if ($("filter-min-score").value !== "") filters.min_score = Number($("filter-min-score").value);
  if ($("filter-sort").value !== "score") filters.sort = $("filter-sort").value;
  return filters;
}

function searchText(query) {
  const k = Number($("k").value);
  showQueryCard(null);
  history.replaceState(null, "", `#q=${encodeURIComponent(query)}`);
  return runSearch(`“${query}”`, () => fetchJSON("/api/search", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ query, k, ...searchFilters() }),
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

// --- jobs: submit, follow (server-sent events, polling as the fallback), previews, cancel ---------

const FINISHED = new Set(["done", "failed", "cancelled"]);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function pollJob(url, onUpdate) {
  for (;;) {
    const job = await fetchJSON(url);
    onUpdate(job);
    if (FINISHED.has(job.status)) return job;
    await sleep(POLL_MS);
  }
}

// Follow a job to its end, calling onUpdate(job) at each change; resolves with the finished job.
function followJob(job, onUpdate) {
  onUpdate(job);
  if (FINISHED.has(job.status)) return Promise.resolve(job);
  if (!window.EventSource) return pollJob(job.url, onUpdate);
  return new Promise((resolve, reject) => {
    const source = new EventSource(`${job.url}/events`);
    let finished = false;
    source.onmessage = (event) => {
      const update = JSON.parse(event.data);
      onUpdate(update);
      if (FINISHED.has(update.status)) { finished = true; source.close(); resolve(update); }
    };
    source.onerror = () => {
      source.close();
      if (!finished) pollJob(job.url, onUpdate).then(resolve, reject);
    };
  });
}

// The progress bar, cancel button and live previews of one place on the page (Generate, Studio).
class JobView {
  constructor(prefix) {
    this.box = $(`${prefix}-progress`);
    this.bar = $(`${prefix}-progress-bar`);
    this.text = $(`${prefix}-progress-text`);
    this.cancelButton = $(`${prefix}-cancel`);
    this.previews = $(`${prefix}-previews`);
    this.job = null;
    this.previewVersion = 0;
    this.cancelButton.addEventListener("click", () => this.cancel());
  }

  async cancel() {
    if (!this.job) return;
    this.cancelButton.disabled = true;
    try {
      await fetchJSON(this.job.url, { method: "DELETE" });
    } catch (e) { /* it finished meanwhile: its last update says how */ }
  }

  show(job) {
    this.job = job;
    show(this.box, true);
    // Between batches the bar follows the rows of the batch being drawn.
    const p = job.preview;
    const total = job.total || (job.settings ? job.settings.num : 0);
    const drawing = p && job.status === "running" && total > 0
      ? (p.first + (p.images.length * p.rows) / p.grid_rows) / total : 0;
    this.bar.value = Math.max(job.progress, Math.min(1, drawing));
    const steps = job.total > 0 ? ` · ${job.done}/${job.total}` : "";
    const label = { queued: "Waiting for the generator", running: "Generating", cancelling: "Cancelling",
                    done: "Done", failed: "Failed", cancelled: "Cancelled" }[job.status];
    const rows = job.preview ? ` · row ${job.preview.rows}/${job.preview.grid_rows}` : "";
    this.text.textContent = `${label}${steps}${job.status === "running" ? rows : ""}`;
    const running = !FINISHED.has(job.status);
    show(this.cancelButton, running);
    this.cancelButton.disabled = job.status === "cancelling";
    if (job.preview && job.preview.version !== this.previewVersion) {
      this.previewVersion = job.preview.version;
      this.drawPreviews(job.preview);
    }
    if (!running) show(this.previews, false);
  }

  drawPreviews(preview) {
    show(this.previews, true);
    const cards = this.previews.children;
    preview.images.forEach((url, i) => {
      let card = cards[i];
      if (!card) {
        card = document.createElement("figure");
        card.className = "card preview";
        const img = document.createElement("img");
        img.alt = "partial image";
        const caption = document.createElement("figcaption");
        card.append(img, caption);
        this.previews.append(card);
      }
      card.dataset.rows = String(preview.rows);
      card.querySelector("img").src = url;
      card.querySelector("figcaption").textContent =
        `sample ${preview.first + i + 1} · row ${preview.rows}/${preview.grid_rows}`;
    });
    while (this.previews.children.length > preview.images.length) this.previews.lastChild.remove();
  }

  // Submit with `submit()` (a promise of the 202 job), follow it; resolves with the finished job.
  async run(submit) {
    this.previewVersion = 0;
    this.previews.replaceChildren();
    this.cancelButton.disabled = false;
    const job = await submit();
    return followJob(job, (update) => this.show(update));
  }
}

async function imageDataURL(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(await apiError(response));
  const blob = await response.blob();
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("could not read the image"));
    reader.readAsDataURL(blob);
  });
}

// --- generate --------------------------------------------------------------------------------

function scoreLabel(image, kind) {
  if (image.score === null) return "not scored";
  return kind === "clip" ? `CLIP ${image.score.toFixed(3)}` : `fit ${image.score.toFixed(2)}`;
}

function iconButton(label, title, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "icon";
  button.textContent = label;
  button.title = title;
  button.setAttribute("aria-label", title);
  button.addEventListener("click", (event) => { event.stopPropagation(); onClick(); });
  return button;
}

function generatedCard(image, prompt, kind, order) {
  const figure = document.createElement("figure");
  figure.className = "card";
  figure.dataset.seed = String(image.seed);
  const img = document.createElement("img");
  img.src = image.url;
  img.alt = prompt;
  const score = scoreLabel(image, kind);
  const where = order === "sampled" ? `sample ${image.sample + 1} · rank ${image.index + 1}`
                                    : `#${image.index + 1}`;
  figure.title = `${where} · ${score} · seed ${image.seed}`;
  const caption = document.createElement("figcaption");
  const rank = document.createElement("span");
  rank.className = "name";
  rank.textContent = order === "sampled" ? `${image.sample + 1} → #${image.index + 1}` : where;
  const value = document.createElement("span");
  value.className = "score";
  value.textContent = score;
  caption.append(rank, value);
  const tools = document.createElement("div");
  tools.className = "card-tools";
  tools.append(iconButton("✎", "edit this image in the studio",
                          () => openInStudio(image.url, { kind: "generated", prompt, seed: image.seed })));
  figure.append(img, caption, tools);
  return figure;
}

// --- sampling settings: the controls marked data-setting="<the API's name>" ----------------------

function settingInputs(formId) {
  return document.querySelectorAll(`#${formId} [data-setting]`);
}

// Each sampling control takes its default and bounds from the server (GET /api/generator
// `settings`, derived from the sampling contract), so the page never repeats them.
function applySettings(settings) {
  const byName = Object.fromEntries(settings.map((s) => [s.name, s]));
  for (const input of document.querySelectorAll("[data-setting]")) {
    const setting = byName[input.dataset.setting];
    if (!setting) continue;
    input.title = setting.description;
    if (setting.type === "boolean") {
      input.checked = Boolean(setting.default);
      continue;
    }
    if (setting.minimum !== null) input.min = String(setting.minimum);
    if (setting.maximum !== null) input.max = String(setting.maximum);
    input.value = setting.default === null ? "" : String(setting.default);
  }
}

// The settings of a form's controls by name; an empty field is left out (the server's default).
function settingValues(formId) {
  const values = {};
  for (const input of settingInputs(formId)) {
    if (input.type === "checkbox") values[input.dataset.setting] = input.checked;
    else if (input.value !== "") values[input.dataset.setting] = Number(input.value);
  }
  return values;
}

// The settings a link gives, into a form's controls.
function setSettings(formId, hash) {
  for (const input of settingInputs(formId)) {
    const value = hash.get(input.dataset.setting);
    if (value === null) continue;
    if (input.type === "checkbox") input.checked = value === "true";
    else input.value = value;
  }
}

function generateRequest() {
  const keep = $("keep").value === "" ? null : Number($("keep").value);
  return { prompt: $("prompt").value, num: Number($("num").value), keep, ...settingValues("generate-form") };
}

function showCompare() {
  show($("generated-samples"), $("compare-toggle").checked && $("generated-sampled").children.length > 0);
}

let generateView = null;

async function generate(event) {
  if (event) event.preventDefault();
  const button = $("generate-button");
  setError("generate-error", "");
  const request = generateRequest();
  button.disabled = true;
  $("generated").replaceChildren();
  $("generated-sampled").replaceChildren();
  show($("generate-compare"), false);
  showCompare();
  try {
    const job = await generateView.run(() => fetchJSON("/api/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request),
    }));
    if (job.status === "cancelled") return;
    if (job.status === "failed") throw new Error(job.error || "generation failed");
    const { prompt, score_kind: kind, images, samples } = job.result;
    $("generated").replaceChildren(...images.map((image) => generatedCard(image, prompt, kind, "ranked")));
    $("generated-sampled").replaceChildren(...samples.map((image) => generatedCard(image, prompt, kind, "sampled")));
    show($("generate-compare"), samples.length > 1);
    showCompare();
    for (const image of images) {
      galleryAdd({ kind: "generate", prompt, url: image.url, score: image.score, scoreKind: kind,
                   seed: image.seed, settings: { ...job.settings, seed: image.seed, num: 1, keep: 1 } });
    }
  } catch (e) {
    setError("generate-error", e.message);
  } finally {
    button.disabled = false;
  }
}

// --- links -----------------------------------------------------------------------------------

// A link that makes an image again: its prompt, seed and settings (image i of a job is drawn
// from seed + i alone, so one image is `num=1` with its own seed).
function reproduceLink(entry) {
  const params = new URLSearchParams({ [entry.kind]: "1", prompt: entry.prompt });
  for (const [key, value] of Object.entries(entry.settings || {})) {
    if (value === null || value === undefined) continue;
    params.set(key, Array.isArray(value) ? value.join(",") : String(value));
  }
  if (entry.source !== undefined && entry.source !== null) params.set("src", String(entry.source));
  return `${location.origin}${location.pathname}#${params}`;
}

function openLink(hash) {
  if (hash.get("generate") && health && health.generation) {
    $("prompt").value = hash.get("prompt") || "";
    for (const id of ["num", "keep"]) if (hash.get(id) !== null) $(id).value = hash.get(id);
    setSettings("generate-form", hash);
    selectTab("generate");
    if ($("prompt").value) generate();
    return true;
  }
  if ((hash.get("edit") || hash.get("complete")) && health && health.generation) {
    openStudioLink(hash);
    return true;
  }
  return false;
}

// --- start -----------------------------------------------------------------------------------

async function start() {
  for (const name of TABS) $(`tab-${name}`).addEventListener("click", () => selectTab(name));
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
  $("compare-toggle").addEventListener("change", showCompare);
  generateView = new JobView("generate");
  setUpDrop();
  renderGallery();
  try {
    health = await fetchJSON("/health");
    $("server-status").textContent = `${health.images.toLocaleString()} images indexed`;
    if (health.generation) {
      for (const tab of ["generate", "studio", "gallery"]) show($(`tab-${tab}`), true);
      for (const id of ["num", "keep", "studio-num", "studio-keep"]) $(id).max = String(health.max_generate);
      await startStudio();
    }
  } catch (e) {
    $("server-status").textContent = e.message;
  }
  // A "make again" link opened in this page only changes the hash.
  window.addEventListener("hashchange", () => openLink(new URLSearchParams(location.hash.slice(1))));
  const hash = new URLSearchParams(location.hash.slice(1));
  if (openLink(hash)) return;
  if (hash.get("q")) {
    $("query").value = hash.get("q");
    searchText(hash.get("q"));
  } else if (hash.get("similar") && /^\d+$/.test(hash.get("similar"))) {
    const id = Number(hash.get("similar"));
    searchSimilar({ id, path: `image ${id}`, thumb_url: `/api/thumb/${id}` });
  }
}

document.addEventListener("DOMContentLoaded", start);
