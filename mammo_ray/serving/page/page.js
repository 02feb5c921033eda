// mammo-ray's page: choose a CC and an MLO image, see the served ensemble's answer.
// Plain JS against this server's own API (relative URLs, so it also works under a route prefix):
// /v1/model (what is served), /v1/preview (the image as the server decodes it), /v1/predict and
// /v1/localize (heatmap=layers: the map and the member spread as grayscale PNGs on the preview's grid).
// For research use only. Not for use in diagnostic procedures.
"use strict";

const VIEWS = ["cc", "mlo"];
const state = { model: null, views: { cc: {}, mlo: {} } };
const $ = (id) => document.getElementById(id);
const KEY_ITEM = "mammo-ray-api-key"; // sessionStorage: this tab only, gone when it closes

function authHeaders() {
  const key = sessionStorage.getItem(KEY_ITEM);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// A 401: ask for the key (the server's reason beside the field); the next call sends it.
function askForKey(reason) {
  $("key-reason").textContent = reason;
  $("key-form").hidden = false;
  $("key-input").focus();
}

function setStatus(text, stateName) {
  const el = $("status");
  el.textContent = text;
  el.dataset.state = stateName;
}

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// An API reply as JSON, or an Error carrying the server's reason ("422 Unprocessable Entity: ... (field box)").
async function api(path, options) {
  const reply = await fetch(path, { ...(options || {}), headers: authHeaders() });
  const type = reply.headers.get("content-type") || "";
  const body = type.includes("json") ? await reply.json() : await reply.text();
  if (!reply.ok) {
    const reason = typeof body === "object" && body.reason ? body.reason : String(body).slice(0, 300);
    const field = typeof body === "object" && body.field ? ` (field ${body.field})` : "";
    const error = new Error(`${reply.status} ${body.error || reply.statusText}: ${reason}${field}`);
    error.status = reply.status;
    if (reply.status === 401) askForKey(reason);
    throw error;
  }
  return body;
}

function form(fields) {
  const data = new FormData();
  for (const [key, value] of Object.entries(fields)) {
    if (value !== null && value !== undefined) data.append(key, value);
  }
  return { method: "POST", body: data };
}

function loadPng(base64) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the server's PNG could not be shown"));
    img.src = `data:image/png;base64,${base64}`;
  });
}

// ---------------------------------------------------------------- the model

async function loadModel() {
  try {
    const info = await api("v1/model");
    state.model = info;
    $("model-status").hidden = true;
    $("model-line").hidden = false;
    const link = $("model-version");
    link.textContent = info.version;
    if (info.run_url) link.href = info.run_url;
    else link.removeAttribute("href");
    $("model-members").textContent = info.members;
    $("model-task").textContent = info.task;
    $("model-localize").textContent = info.localize.available
      ? `heatmaps by ${info.localize.default_method}`
      : `no heatmaps: ${info.localize.note}`;
    $("positive-class").textContent = (info.class_names || ["class 0", "class 1"])[1];
  } catch (error) {
    if (error.status === 401) {
      $("model-status").textContent = "enter the API key to use this server";
      return; // the key form calls loadModel again
    }
    $("model-status").textContent = `model not ready (${error.message}); retrying`;
    setTimeout(loadModel, 3000);
  }
}

// ---------------------------------------------------------------- images and ROIs

function canvases(view) {
  return { image: $(`${view}-image`), overlay: $(`${view}-overlay`), marks: $(`${view}-marks`) };
}

async function chooseFile(view, file) {
  clearError();
  const slot = state.views[view];
  Object.assign(slot, { file, preview: null, roi: null, layers: null, boxes: [] });
  $(`${view}-roi`).textContent = "none";
  const { image, overlay, marks } = canvases(view);
  for (const c of [image, overlay, marks]) c.getContext("2d").clearRect(0, 0, c.width, c.height);
  updateAnalyse();
  setStatus(`reading ${file.name}`, "busy");
  try {
    const preview = await api("v1/preview", form({ file }));
    const img = await loadPng(preview.image_png_base64);
    slot.preview = { ...preview, img };
    for (const c of [image, overlay, marks]) {
      c.width = img.naturalWidth;
      c.height = img.naturalHeight;
    }
    image.getContext("2d").drawImage(img, 0, 0);
    setStatus(`${view.toUpperCase()}: ${file.name} (${preview.image_size.join(" x ")} px, ${preview.kind})`, "idle");
  } catch (error) {
    slot.file = null;
    showError(`${view.toUpperCase()} ${file.name}: ${error.message}`);
    setStatus("choose another file", "error");
  }
  updateAnalyse();
}

function updateAnalyse() {
  const ready = VIEWS.some((v) => state.views[v].file && state.views[v].preview);
  $("analyse").disabled = !ready;
}

// Canvas pixels (the preview's) from a mouse event, and original pixels from those.
function canvasPoint(canvas, event) {
  const rect = canvas.getBoundingClientRect();
  return [
    ((event.clientX - rect.left) * canvas.width) / rect.width,
    ((event.clientY - rect.top) * canvas.height) / rect.height,
  ];
}

function drawMarks(view, dragBox) {
  const slot = state.views[view];
  const { marks } = canvases(view);
  const ctx = marks.getContext("2d");
  ctx.clearRect(0, 0, marks.width, marks.height);
  if (!slot.preview) return;
  const s = slot.preview.scale;
  ctx.lineWidth = Math.max(1, marks.width / 300);
  ctx.font = `${Math.max(10, marks.width / 40)}px sans-serif`;
  for (const box of slot.boxes || []) {
    ctx.strokeStyle = "#00e5ff";
    ctx.strokeRect(box.x0 * s, box.y0 * s, (box.x1 - box.x0) * s, (box.y1 - box.y0) * s);
    ctx.fillStyle = "#00e5ff";
    ctx.fillText(box.score.toFixed(2), box.x0 * s + 2, Math.max(10, box.y0 * s - 3));
  }
  const roi = dragBox || (slot.roi && slot.roi.map((v) => v * s));
  if (roi) {
    ctx.setLineDash([6, 4]);
    ctx.strokeStyle = "#ffd400";
    ctx.strokeRect(roi[0], roi[1], roi[2] - roi[0], roi[3] - roi[1]);
    ctx.setLineDash([]);
  }
}

function wireRoi(view) {
  const { marks } = canvases(view);
  let start = null;
  const box = (a, b) => [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
  marks.addEventListener("mousedown", (event) => {
    if (!state.views[view].preview) return;
    start = canvasPoint(marks, event);
  });
  marks.addEventListener("mousemove", (event) => {
    if (start) drawMarks(view, box(start, canvasPoint(marks, event)));
  });
  window.addEventListener("mouseup", (event) => {
    if (!start) return;
    const slot = state.views[view];
    const [h, w] = slot.preview.image_size;
    const s = slot.preview.scale;
    const b = box(start, canvasPoint(marks, event));
    start = null;
    // Original pixels, half-open (x1, y1 exclusive), inside the image.
    const x0 = Math.max(0, Math.floor(b[0] / s));
    const y0 = Math.max(0, Math.floor(b[1] / s));
    const x1 = Math.min(w, Math.ceil(b[2] / s));
    const y1 = Math.min(h, Math.ceil(b[3] / s));
    if (x1 - x0 < 2 || y1 - y0 < 2) {
      slot.roi = null; // a click, not a drag
    } else {
      slot.roi = [x0, y0, x1, y1];
    }
    $(`${view}-roi`).textContent = slot.roi ? slot.roi.join(",") : "none";
    drawMarks(view);
  });
  $(`${view}-clear`).addEventListener("click", () => {
    state.views[view].roi = null;
    $(`${view}-roi`).textContent = "none";
    drawMarks(view);
  });
}

function wireFile(view) {
  const input = $(`${view}-file`);
  const drop = $(`${view}-drop`);
  input.addEventListener("change", () => {
    if (input.files.length) chooseFile(view, input.files[0]);
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) chooseFile(view, event.dataTransfer.files[0]);
  });
}

// ---------------------------------------------------------------- heatmap layers

// Matplotlib's jet, piecewise linear: 0 blue, 0.35 cyan, 0.5 green, 0.65 yellow, 1 red.
function jet(v) {
  const r = Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - 3)));
  const g = Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - 2)));
  const b = Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - 1)));
  return [r * 255, g * 255, b * 255];
}

function drawOverlay(view) {
  const slot = state.views[view];
  const { overlay } = canvases(view);
  const ctx = overlay.getContext("2d");
  ctx.clearRect(0, 0, overlay.width, overlay.height);
  if (!slot.layers || !$("overlay-toggle").checked) return;
  const img = slot.layers[$("layer").value];
  if (!img) return;
  const opacity = Number($("opacity").value) / 100;
  // The grey layer is drawn first, then each pixel is coloured; its alpha grows with its value, so
  // where the map is low the image shows through.
  ctx.drawImage(img, 0, 0, overlay.width, overlay.height);
  const pixels = ctx.getImageData(0, 0, overlay.width, overlay.height);
  const d = pixels.data;
  for (let i = 0; i < d.length; i += 4) {
    const v = d[i] / 255;
    const [r, g, b] = jet(v);
    d[i] = r;
    d[i + 1] = g;
    d[i + 2] = b;
    d[i + 3] = Math.round(255 * opacity * Math.min(1, 1.5 * v));
  }
  ctx.putImageData(pixels, 0, 0);
}

function redrawOverlays() {
  for (const view of VIEWS) drawOverlay(view);
}

// ---------------------------------------------------------------- the answer

function drawMembers(probabilities, threshold) {
  const canvas = $("members-strip");
  const ctx = canvas.getContext("2d");
  const w = canvas.width;
  const h = canvas.height;
  const pad = 12;
  const x = (p) => pad + p * (w - 2 * pad);
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = "#f4f4f4";
  ctx.fillRect(pad, 8, w - 2 * pad, h - 30);
  ctx.strokeStyle = "#b3261e";
  ctx.beginPath();
  ctx.moveTo(x(threshold), 4);
  ctx.lineTo(x(threshold), h - 18);
  ctx.stroke();
  ctx.strokeStyle = "rgba(20, 60, 160, 0.55)";
  ctx.lineWidth = 2;
  for (const p of probabilities) {
    ctx.beginPath();
    ctx.moveTo(x(p), 10);
    ctx.lineTo(x(p), h - 24);
    ctx.stroke();
  }
  ctx.fillStyle = "#333";
  ctx.font = "11px sans-serif";
  for (const t of [0, 0.25, 0.5, 0.75, 1]) ctx.fillText(t.toFixed(2), x(t) - 10, h - 6);
}

function showPrediction(reply) {
  const probability = $("probability");
  probability.textContent = reply.probability.toFixed(4);
  probability.dataset.value = String(reply.probability);
  const calibrated = reply.calibrated_probability;
  $("calibrated").textContent = calibrated === null ? "none (the model has no calibration)" : calibrated.toFixed(4);
  $("label").textContent = reply.label;
  $("threshold").textContent = reply.threshold;
  $("views-probs").textContent = Object.entries(reply.views)
    .map(([k, v]) => `${k} ${v.toFixed(4)}`)
    .join(", ") || "one joint view";
  const refer = reply.refer;
  const referEl = $("refer");
  referEl.textContent = refer.refer === null ? "no policy" : refer.refer ? "yes: refer to a reader" : "no";
  referEl.className = refer.refer ? "refer-yes" : "";
  $("refer-reason").textContent = refer.reason || "";
  $("operating-points").textContent =
    reply.operating_points.map((o) => `${o.name}: ${o.label} (t=${o.threshold.toFixed(3)})`).join("; ") || "none";
  $("members-count").textContent = reply.members.count;
  $("members-mean").textContent = reply.members.mean.toFixed(4);
  $("members-std").textContent = reply.members.std.toFixed(4);
  drawMembers(reply.members.probabilities, reply.threshold);
}

function showBoxes() {
  const list = $("boxes");
  list.textContent = "";
  for (const view of VIEWS) {
    const slot = state.views[view];
    if (!slot.preview) continue;
    if (slot.layersError) {
      const li = document.createElement("li");
      li.textContent = `${view.toUpperCase()}: no heatmap (${slot.layersError})`;
      list.appendChild(li);
    }
    for (const b of slot.boxes || []) {
      const li = document.createElement("li");
      li.textContent = `${view.toUpperCase()}: (${b.x0}, ${b.y0}, ${b.x1}, ${b.y1}) score ${b.score.toFixed(3)}`;
      list.appendChild(li);
    }
  }
  if (!list.children.length) list.textContent = "none above the threshold";
}

async function localizeView(view) {
  const slot = state.views[view];
  slot.layers = null;
  slot.boxes = [];
  slot.layersError = null;
  if (!state.model || !state.model.localize.available) {
    slot.layersError = state.model ? state.model.localize.note : "model not loaded";
    return;
  }
  try {
    const reply = await api("v1/localize", form({ file: slot.file, heatmap: "layers" }));
    const layers = reply.heatmap_layers;
    slot.layers = {
      map: await loadPng(layers.map_png_base64),
      spread: await loadPng(layers.spread_png_base64),
    };
    slot.boxes = reply.boxes;
  } catch (error) {
    slot.layersError = error.message;
  }
}

async function analyse() {
  clearError();
  $("analyse").disabled = true;
  setStatus("asking the ensemble", "busy");
  const chosen = VIEWS.filter((v) => state.views[v].file && state.views[v].preview);
  const fields = {};
  if (chosen.length === 2) {
    for (const view of VIEWS) {
      fields[view] = state.views[view].file;
      if (state.views[view].roi) fields[`${view}_box`] = state.views[view].roi.join(",");
    }
  } else {
    const slot = state.views[chosen[0]];
    fields.file = slot.file;
    if (slot.roi) fields.box = slot.roi.join(",");
  }
  try {
    const reply = await api("v1/predict", form(fields));
    showPrediction(reply);
    await Promise.all(chosen.map(localizeView));
    for (const view of VIEWS) {
      drawOverlay(view);
      drawMarks(view);
    }
    showBoxes();
    $("result").hidden = false;
    setStatus("done", "done");
  } catch (error) {
    showError(error.message);
    setStatus("the server refused the request; see the message", "error");
  } finally {
    updateAnalyse();
  }
}

// ---------------------------------------------------------------- start

for (const view of VIEWS) {
  wireFile(view);
  wireRoi(view);
}
$("analyse").addEventListener("click", analyse);
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_ITEM, key);
  $("key-input").value = "";
  $("key-form").hidden = true;
  clearError();
  loadModel();
});
for (const id of ["overlay-toggle", "opacity", "layer"]) $(id).addEventListener("input", redrawOverlays);
$("layer").addEventListener("change", redrawOverlays);
loadModel();
