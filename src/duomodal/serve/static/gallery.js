// The gallery: what was generated and edited on this page, kept in this browser (localStorage),
// newest first, each with its prompt, seed and settings, a PNG download, a link that makes it
// again, and a button that opens it in the studio.
"use strict";

const GALLERY_KEY = "duomodal.gallery";
const GALLERY_MAX = 120; // entries kept; small PNGs as data URLs, well under the storage quota
let galleryEntries = null;

function galleryLoad() {
  if (galleryEntries !== null) return galleryEntries;
  try {
    const stored = JSON.parse(localStorage.getItem(GALLERY_KEY) || "[]");
    galleryEntries = Array.isArray(stored) ? stored.filter((e) => e && typeof e.image === "string") : [];
  } catch (e) {
    galleryEntries = [];
  }
  return galleryEntries;
}

function gallerySave() {
  const entries = galleryLoad();
  for (;;) {
    try {
      localStorage.setItem(GALLERY_KEY, JSON.stringify(entries));
      return;
    } catch (e) { // over the quota: the oldest go first
      if (entries.length <= 1) return;
      entries.pop();
    }
  }
}

// entry: {kind: "generate"|"edit"|"complete", prompt, url (PNG), score, scoreKind, seed, settings, source}
async function galleryAdd(entry) {
  const image = await imageDataURL(entry.url);
  const entries = galleryLoad();
  const { url, ...kept } = entry;
  entries.unshift({ ...kept, image, id: `${Date.now()}-${Math.random().toString(16).slice(2, 8)}`,
                    created: new Date().toISOString() });
  entries.length = Math.min(entries.length, GALLERY_MAX);
  gallerySave();
  renderGallery();
}

function galleryRemove(id) {
  galleryEntries = galleryLoad().filter((e) => e.id !== id);
  gallerySave();
  renderGallery();
}

function settingsText(entry) {
  const s = entry.settings || {};
  const parts = [`seed ${entry.seed}`];
  if (s.guidance !== undefined && s.guidance !== null) parts.push(`guidance ${s.guidance}`);
  if (s.top_k !== undefined) parts.push(`top-k ${s.top_k === null ? "all" : s.top_k}`);
  if (s.temperature !== undefined && s.temperature !== null) parts.push(`temperature ${s.temperature}`);
  if (s.box) parts.push(`box ${s.box.join(",")}`);
  if (s.rows !== undefined && s.rows !== null) parts.push(`${s.rows} rows kept`);
  return parts.join(" · ");
}

function fileName(entry) {
  const words = entry.prompt.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "").slice(0, 40);
  return `${entry.kind}-${words || "image"}-seed${entry.seed}.png`;
}

function galleryCard(entry) {
  const figure = document.createElement("figure");
  figure.className = "gallery-card";
  figure.dataset.kind = entry.kind;
  const img = document.createElement("img");
  img.src = entry.image;
  img.alt = entry.prompt;
  const caption = document.createElement("figcaption");
  const title = document.createElement("strong");
  title.textContent = `${{ generate: "Generated", edit: "Edited", complete: "Completed" }[entry.kind]}: ${entry.prompt}`;
  const details = document.createElement("span");
  details.className = "muted";
  const score = entry.score === null || entry.score === undefined ? "" : ` · ${scoreLabel(entry, entry.scoreKind)}`;
  details.textContent = settingsText(entry) + score;
  const actions = document.createElement("span");
  actions.className = "actions";
  const download = document.createElement("a");
  download.href = entry.image;
  download.download = fileName(entry);
  download.textContent = "PNG";
  download.title = "download the PNG";
  actions.append(download);
  if (entry.kind === "generate" || (entry.source !== undefined && entry.source !== null)) {
    const link = document.createElement("a");
    link.href = reproduceLink(entry);
    link.className = "again";
    link.textContent = "Make again";
    link.title = "a link with the prompt, seed and settings that make this image again";
    actions.append(link);
  }
  actions.append(
    iconButton("✎", "edit this image in the studio",
               () => openInStudio(entry.image, { kind: "gallery", prompt: entry.prompt, seed: entry.seed })),
    iconButton("✕", "remove from the gallery", () => galleryRemove(entry.id)),
  );
  caption.append(title, details, actions);
  figure.append(img, caption);
  return figure;
}

function renderGallery() {
  const entries = galleryLoad();
  $("gallery").replaceChildren(...entries.map(galleryCard));
  show($("gallery-empty"), entries.length === 0);
  $("gallery-count").textContent = entries.length ? String(entries.length) : "";
}
