// The studio: open an image (a search result, a generated image, a gallery item or an upload),
// then either draw a box (mouse, touch or arrow keys; it snaps to the model's token grid) and
// have the model redraw it, or keep the rows above a line and have the model draw the rest.
// Candidates come back reranked; clicking one keeps it, so edits chain, with undo.
"use strict";

const CANVAS_SIZE = 384;

const studio = {
  info: null, // /api/generator: image_size, grid_size
  mode: "edit", // "edit" | "complete"
  history: [], // the chain: [{blob, url, image, label, origin}]; the last is the current image
  box: null, // {c0, r0, c1, r1}: token cells, c1/r1 exclusive
  line: 2, // complete: token rows kept
  dragStart: null,
  view: null,
  busy: false,
};

function cellPixels() { return CANVAS_SIZE / studio.info.grid_size; }
function modelCell() { return studio.info.image_size / studio.info.grid_size; }
function current() { return studio.history[studio.history.length - 1] || null; }
const clamp = (value, low, high) => Math.max(low, Math.min(high, value));

// --- drawing ---------------------------------------------------------------------------------

function drawStudio() {
  const canvas = $("studio-canvas");
  const context = canvas.getContext("2d");
  const item = current();
  show($("studio-empty"), !item);
  context.clearRect(0, 0, CANVAS_SIZE, CANVAS_SIZE);
  if (!item || !studio.info) { updateSelection(); return; }
  context.imageSmoothingEnabled = false;
  context.drawImage(item.image, 0, 0, CANVAS_SIZE, CANVAS_SIZE);
  const G = studio.info.grid_size;
  const cell = cellPixels();
  context.strokeStyle = "rgba(255, 255, 255, 0.35)";
  context.lineWidth = 1;
  for (let i = 1; i < G; i += 1) {
    context.beginPath();
    context.moveTo(i * cell + 0.5, 0); context.lineTo(i * cell + 0.5, CANVAS_SIZE);
    context.moveTo(0, i * cell + 0.5); context.lineTo(CANVAS_SIZE, i * cell + 0.5);
    context.stroke();
  }
  context.fillStyle = "rgba(15, 20, 40, 0.45)";
  if (studio.mode === "edit" && studio.box) {
    const { c0, r0, c1, r1 } = studio.box;
    const [x, y, w, h] = [c0 * cell, r0 * cell, (c1 - c0) * cell, (r1 - r0) * cell];
    context.fillRect(0, 0, CANVAS_SIZE, y);
    context.fillRect(0, y + h, CANVAS_SIZE, CANVAS_SIZE - y - h);
    context.fillRect(0, y, x, h);
    context.fillRect(x + w, y, CANVAS_SIZE - x - w, h);
    context.fillStyle = "rgba(255, 214, 10, 0.9)";
    for (let r = r0; r < r1; r += 1) {
      for (let c = c0; c < c1; c += 1) {
        context.fillRect((c + 0.5) * cell - 2, (r + 0.5) * cell - 2, 4, 4); // a token to redraw
      }
    }
    context.strokeStyle = "#ffd60a";
    context.lineWidth = 3;
    context.strokeRect(x + 1.5, y + 1.5, w - 3, h - 3);
  } else if (studio.mode === "complete") {
    const y = studio.line * cell;
    context.fillRect(0, y, CANVAS_SIZE, CANVAS_SIZE - y);
    context.strokeStyle = "#ffd60a";
    context.lineWidth = 3;
    context.beginPath();
    context.moveTo(0, y); context.lineTo(CANVAS_SIZE, y);
    context.stroke();
    context.fillStyle = "#ffd60a";
    context.fillRect(CANVAS_SIZE / 2 - 18, y - 5, 36, 10); // the handle
  }
  updateSelection();
}

function updateSelection() {
  const item = current();
  let text = "";
  let ready = Boolean(item) && !studio.busy;
  if (item && studio.info) {
    const G = studio.info.grid_size;
    const px = modelCell();
    if (studio.mode === "edit") {
      if (studio.box) {
        const { c0, r0, c1, r1 } = studio.box;
        const n = (c1 - c0) * (r1 - r0);
        text = `Redraw ${n} of ${G * G} tokens: columns ${c0 + 1}–${c1}, rows ${r0 + 1}–${r1} ` +
               `(pixels ${c0 * px},${r0 * px} to ${c1 * px},${r1 * px})`;
      } else {
        text = "Drag on the image to choose the box to redraw.";
        ready = false;
      }
    } else {
      text = `Keep the top ${studio.line} of ${G} token rows (${studio.line * px} px); ` +
             `the model draws the other ${G - studio.line}.`;
    }
  }
  $("studio-selection").textContent = text;
  $("studio-run").disabled = !ready;
  $("studio-run").textContent = studio.mode === "edit" ? "Redraw the box" : "Complete the image";
  $("studio-undo").disabled = studio.history.length < 2 || studio.busy;
}

function renderHistory() {
  const strip = $("studio-history");
  strip.replaceChildren(...studio.history.map((item, n) => {
    const figure = document.createElement("figure");
    figure.className = n === studio.history.length - 1 ? "step current" : "step";
    const img = document.createElement("img");
    img.src = item.url;
    img.alt = item.label;
    const caption = document.createElement("figcaption");
    caption.textContent = n === 0 ? "original" : `${n}. ${item.label}`;
    figure.append(img, caption);
    return figure;
  }));
}

// --- the image -------------------------------------------------------------------------------

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("that file is not an image the browser can show"));
    image.src = url;
  });
}

// The image as the model sees it: shorter side scaled to its size, centre square (as the server
// fits uploads). An image already that size is kept byte for byte.
async function fitToModel(blob) {
  const size = studio.info.image_size;
  const source = URL.createObjectURL(blob);
  try {
    const image = await loadImage(source);
    if (image.naturalWidth === size && image.naturalHeight === size) return blob;
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = size;
    const scale = size / Math.min(image.naturalWidth, image.naturalHeight);
    const [w, h] = [image.naturalWidth * scale, image.naturalHeight * scale];
    const context = canvas.getContext("2d");
    context.imageSmoothingQuality = "high";
    context.drawImage(image, (size - w) / 2, (size - h) / 2, w, h);
    return await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  } finally {
    URL.revokeObjectURL(source);
  }
}

async function historyItem(blob, label, origin) {
  const url = URL.createObjectURL(blob);
  return { blob, url, image: await loadImage(url), label, origin };
}

// A data: URL as a Blob, without fetch (the page's CSP lets it fetch only from this server).
function blobFromDataURL(url) {
  const [head, data] = url.split(",", 2);
  const type = (head.match(/^data:([^;,]+)/) || [])[1] || "application/octet-stream";
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type });
}

// Open `source` (a URL of this server, a data: URL, or a Blob such as an uploaded File).
async function openInStudio(source, origin) {
  selectTab("studio");
  setError("studio-error", "");
  if (studio.busy) {
    setError("studio-error", "a job is running on the current image: wait for it, or cancel it, first");
    return;
  }
  try {
    let blob = source;
    if (typeof source === "string" && source.startsWith("data:")) {
      blob = blobFromDataURL(source);
    } else if (typeof source === "string") {
      const response = await fetch(source);
      if (!response.ok) throw new Error(await apiError(response));
      blob = await response.blob();
    }
    blob = await fitToModel(blob);
    for (const item of studio.history) URL.revokeObjectURL(item.url);
    studio.history = [await historyItem(blob, "original", origin || { kind: "upload" })];
    $("studio-candidates").replaceChildren();
    show($("studio-candidates-hint"), false);
    renderHistory();
    drawStudio();
    $("studio-canvas").focus();
  } catch (e) {
    setError("studio-error", e.message);
  }
}

function undo() {
  if (studio.history.length < 2 || studio.busy) return;
  URL.revokeObjectURL(studio.history.pop().url);
  $("studio-candidates").replaceChildren();
  show($("studio-candidates-hint"), false);
  renderHistory();
  drawStudio();
}

// --- the box and the line: pointer (mouse, touch, pen) and keyboard -------------------------

function cellAt(event) {
  const rect = $("studio-canvas").getBoundingClientRect();
  const G = studio.info.grid_size;
  const x = ((event.clientX - rect.left) / rect.width) * G;
  const y = ((event.clientY - rect.top) / rect.height) * G;
  return { c: clamp(Math.floor(x), 0, G - 1), r: clamp(Math.floor(y), 0, G - 1), y: clamp(y, 0, G) };
}

function boxFrom(a, b) {
  return { c0: Math.min(a.c, b.c), r0: Math.min(a.r, b.r), c1: Math.max(a.c, b.c) + 1, r1: Math.max(a.r, b.r) + 1 };
}

function setLine(rows) {
  studio.line = clamp(rows, 0, studio.info.grid_size - 1);
  drawStudio();
}

function onPointerDown(event) {
  if (!current() || !studio.info || event.button > 0) return;
  event.preventDefault();
  $("studio-canvas").setPointerCapture(event.pointerId);
  const at = cellAt(event);
  studio.dragStart = at;
  if (studio.mode === "edit") {
    studio.box = boxFrom(at, at);
    drawStudio();
  } else {
    setLine(Math.round(at.y));
  }
}

function onPointerMove(event) {
  if (!studio.dragStart) return;
  const at = cellAt(event);
  if (studio.mode === "edit") {
    studio.box = boxFrom(studio.dragStart, at);
    drawStudio();
  } else {
    setLine(Math.round(at.y));
  }
}

function onPointerUp() { studio.dragStart = null; }

const ARROWS = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };

function onCanvasKey(event) {
  if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z") {
    event.preventDefault();
    undo();
    return;
  }
  const arrow = ARROWS[event.key];
  if (!arrow || !current() || !studio.info) return;
  event.preventDefault();
  const G = studio.info.grid_size;
  const [dx, dy] = arrow;
  if (studio.mode === "complete") {
    setLine(studio.line + dy);
    return;
  }
  if (!studio.box) {
    const middle = Math.floor(G / 2);
    const low = Math.max(0, middle - 1);
    studio.box = { c0: low, r0: low, c1: Math.min(G, middle + 1), r1: Math.min(G, middle + 1) };
  } else if (event.shiftKey) { // resize: the right and bottom edges
    const box = studio.box;
    box.c1 = clamp(box.c1 + dx, box.c0 + 1, G);
    box.r1 = clamp(box.r1 + dy, box.r0 + 1, G);
  } else { // move, keeping the size
    const box = studio.box;
    const w = box.c1 - box.c0;
    const h = box.r1 - box.r0;
    box.c0 = clamp(box.c0 + dx, 0, G - w);
    box.r0 = clamp(box.r0 + dy, 0, G - h);
    box.c1 = box.c0 + w;
    box.r1 = box.r0 + h;
  }
  drawStudio();
}

function setMode(mode) {
  studio.mode = mode;
  for (const name of ["edit", "complete"]) $(`mode-${name}`).setAttribute("aria-checked", String(name === mode));
  $("studio-prompt").placeholder = mode === "edit" ? "What to draw there, e.g. a red circle"
                                                   : "What the whole image shows, e.g. a red circle";
  drawStudio();
}

// --- running an edit or a completion ---------------------------------------------------------

function studioForm() {
  const item = current();
  const form = new FormData();
  form.append("file", item.blob, "image.png");
  form.append("prompt", $("studio-prompt").value);
  form.append("num", $("studio-num").value);
  if ($("studio-keep").value !== "") form.append("keep", $("studio-keep").value);
  // the sampling settings: every [data-setting] control, named as the API names the setting
  for (const [name, value] of Object.entries(settingValues("studio-form"))) form.append(name, String(value));
  if (studio.mode === "edit") {
    const px = modelCell();
    const { c0, r0, c1, r1 } = studio.box;
    form.append("left", String(c0 * px));
    form.append("top", String(r0 * px));
    form.append("right", String(c1 * px));
    form.append("bottom", String(r1 * px));
  } else {
    form.append("rows", String(studio.line));
  }
  return form;
}

function candidateCard(image, job) {
  const figure = document.createElement("figure");
  figure.className = "card candidate";
  figure.tabIndex = 0;
  figure.dataset.seed = String(image.seed);
  const img = document.createElement("img");
  img.src = image.url;
  img.alt = `candidate ${image.index + 1}`;
  const score = scoreLabel(image, job.result.score_kind);
  figure.title = `#${image.index + 1} · ${score} · seed ${image.seed}: click to keep it`;
  const caption = document.createElement("figcaption");
  const rank = document.createElement("span");
  rank.className = "name";
  rank.textContent = `#${image.index + 1}`;
  const value = document.createElement("span");
  value.className = "score";
  value.textContent = score;
  caption.append(rank, value);
  figure.append(img, caption);
  const choose = () => keepCandidate(image, job);
  figure.addEventListener("click", choose);
  figure.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); choose(); }
  });
  return figure;
}

async function keepCandidate(image, job) {
  if (studio.busy) return;
  setError("studio-error", "");
  try {
    const response = await fetch(image.url);
    if (!response.ok) throw new Error(await apiError(response));
    const first = studio.history[0];
    const fromIndex = studio.history.length === 1 && first.origin.kind === "index";
    studio.history.push(await historyItem(await response.blob(), job.prompt, first.origin));
    $("studio-candidates").replaceChildren();
    show($("studio-candidates-hint"), false);
    renderHistory();
    drawStudio();
    galleryAdd({ kind: job.kind, prompt: job.prompt, url: image.url, score: image.score,
                 scoreKind: job.result.score_kind, seed: image.seed,
                 settings: { ...job.settings, seed: image.seed, num: 1, keep: 1 },
                 source: fromIndex ? first.origin.id : null });
  } catch (e) {
    setError("studio-error", e.message);
  }
}

async function runStudio(event) {
  if (event) event.preventDefault();
  if (!current() || studio.busy || (studio.mode === "edit" && !studio.box)) return;
  setError("studio-error", "");
  studio.busy = true;
  updateSelection();
  $("studio-candidates").replaceChildren();
  show($("studio-candidates-hint"), false);
  const url = studio.mode === "edit" ? "/api/edit" : "/api/complete";
  try {
    const form = studioForm();
    const job = await studio.view.run(() => fetchJSON(url, { method: "POST", body: form }));
    if (job.status === "failed") throw new Error(job.error || "the job failed");
    if (job.status === "done") {
      $("studio-candidates").replaceChildren(...job.result.images.map((image) => candidateCard(image, job)));
      show($("studio-candidates-hint"), true);
    }
  } catch (e) {
    setError("studio-error", e.message);
  } finally {
    studio.busy = false;
    updateSelection();
  }
}

// A link from the gallery: #edit=1&src=ID&box=l,t,r,b&prompt=... or #complete=1&src=ID&rows=R&...
async function openStudioLink(hash) {
  const id = hash.get("src");
  if (!id || !/^\d+$/.test(id)) return;
  setMode(hash.get("edit") ? "edit" : "complete");
  await openInStudio(`/api/image/${id}`, { kind: "index", id: Number(id) });
  if (!current()) return;
  $("studio-prompt").value = hash.get("prompt") || "";
  for (const name of ["num", "keep"]) {
    if (hash.get(name) !== null) $(`studio-${name}`).value = hash.get(name);
  }
  setSettings("studio-form", hash);
  const px = modelCell();
  const box = (hash.get("box") || "").split(",").map(Number);
  if (studio.mode === "edit" && box.length === 4 && box.every(Number.isFinite)) {
    studio.box = { c0: Math.floor(box[0] / px), r0: Math.floor(box[1] / px),
                   c1: Math.ceil(box[2] / px), r1: Math.ceil(box[3] / px) };
  }
  if (studio.mode === "complete" && /^\d+$/.test(hash.get("rows") || "")) studio.line = Number(hash.get("rows"));
  drawStudio();
  if ($("studio-prompt").value && !$("studio-run").disabled) runStudio();
}

async function startStudio() {
  studio.info = await fetchJSON("/api/generator");
  applySettings(studio.info.settings || []);  // the generate tab's controls too
  studio.line = Math.max(1, Math.floor(studio.info.grid_size / 2));
  studio.view = new JobView("studio");
  const canvas = $("studio-canvas");
  canvas.addEventListener("pointerdown", onPointerDown);
  canvas.addEventListener("pointermove", onPointerMove);
  canvas.addEventListener("pointerup", onPointerUp);
  canvas.addEventListener("pointercancel", onPointerUp);
  canvas.addEventListener("keydown", onCanvasKey);
  $("mode-edit").addEventListener("click", () => setMode("edit"));
  $("mode-complete").addEventListener("click", () => setMode("complete"));
  $("studio-undo").addEventListener("click", undo);
  $("studio-form").addEventListener("submit", runStudio);
  $("studio-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    event.target.value = "";
    if (file) openInStudio(file, { kind: "upload", name: file.name });
  });
  drawStudio();
}
