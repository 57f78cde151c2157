"use strict";
// The page talks only to this server (no CDN, no telemetry): /api/card, /api/predict, /api/cam.
const $ = (id) => document.getElementById(id);
let card = null;
let currentFile = null;

function cell(row, text) { const td = document.createElement("td"); td.textContent = text; row.appendChild(td); return td; }
function fmt(v, digits = 3) { return v === null || v === undefined ? "n/a" : Number(v).toFixed(digits); }
function setState(state) { document.body.dataset.state = state; }

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "";
  setState("error");
}

async function post(url, file, fields) {
  const form = new FormData();
  form.append("file", file, file.name);
  for (const [k, v] of Object.entries(fields || {})) form.append(k, v);
  const response = await fetch(url, { method: "POST", body: form });
  let body;
  try { body = await response.json(); } catch (e) { body = { error: `HTTP ${response.status}` }; }
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function renderFindings(record) {
  const tbody = $("findings").querySelector("tbody");
  tbody.replaceChildren();
  const positive = new Set(record.positive);
  const names = Object.keys(record.probabilities).sort((a, b) => record.probabilities[b] - record.probabilities[a]);
  for (const name of names) {
    const row = document.createElement("tr");
    row.dataset.finding = name;
    if (positive.has(name)) row.classList.add("positive");
    cell(row, name);
    cell(row, fmt(record.probabilities[name], 4)).className = "probability";
    cell(row, card ? fmt(card.thresholds[name], 4) : "");
    cell(row, positive.has(name) ? "positive" : "negative");
    tbody.appendChild(row);
  }
  const warnings = $("warnings");
  warnings.replaceChildren();
  for (const w of record.warnings) { const li = document.createElement("li"); li.textContent = `warning: ${w}`; warnings.appendChild(li); }
}

function renderCams(result) {
  const box = $("overlays");
  box.replaceChildren();
  for (const o of result.overlays) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = o.png;
    img.alt = `Grad-CAM of ${o.finding}`;
    img.className = "overlay";
    const cap = document.createElement("figcaption");
    cap.textContent = `${o.finding} (p = ${fmt(o.probability, 3)})`;
    fig.append(img, cap);
    box.appendChild(fig);
  }
  const empty = $("no-evidence");
  empty.replaceChildren();
  for (const e of result.no_evidence) { const li = document.createElement("li"); li.textContent = `${e.finding}: ${e.message}`; empty.appendChild(li); }
  $("cam-status").textContent = result.overlays.length || result.no_evidence.length
    ? `layer ${result.target_layer || "?"}`
    : "no finding at or above its threshold: pick one above to see its map";
}

async function runCam() {
  if (!currentFile) return;
  setState("busy");
  $("cam-status").textContent = "computing Grad-CAM...";
  try {
    renderCams(await post("/api/cam", currentFile, { finding: $("finding").value }));
    $("status").textContent = "done";
    setState("done");
  } catch (e) { showError(e.message); }
}

async function analyse(file) {
  currentFile = null;
  $("error").hidden = true;
  $("result").hidden = true;
  $("status").textContent = `analysing ${file.name}...`;
  setState("busy");
  try {
    const body = await post("/api/predict", file);
    const record = body.predictions[0];
    currentFile = file;
    $("image-name").textContent = record.image;
    const preview = $("preview");
    preview.hidden = false;
    preview.onerror = () => { preview.hidden = true; };
    preview.src = URL.createObjectURL(file);
    renderFindings(record);
    $("result").hidden = false;
    await runCam();
  } catch (e) { showError(e.message); }
}

function renderCard(c) {
  const list = $("card-list");
  const data = c.training_data || {};
  const test = c.test;
  const items = [
    ["architecture", c.arch], ["recipe", c.recipe || "n/a"], ["input", `${c.image_size} px`], ["best epoch", c.epoch],
    ["training data", [data.source, data.rows ? `${data.rows} rows` : null, data.split ? `split ${data.split}` : null].filter(Boolean).join(", ") || "n/a"],
    ["training data sha256", data.sha256 || "not recorded"],
    ["thresholds", c.thresholds_tuned ? "tuned on the validation split (max F1)" : "0.5 (not tuned)"],
    ["val AUROC (macro)", fmt(c.val_auc_mean, 4)],
    ["test AUROC (macro)", test && test.macro_auc ? `${fmt(test.macro_auc.value, 4)}${test.macro_auc.ci ? ` [${fmt(test.macro_auc.ci[0], 4)}, ${fmt(test.macro_auc.ci[1], 4)}]` : ""} on ${test.samples} images` : "not evaluated (chexdist evaluate)"],
    ["chexdist", c.chexdist_version], ["notice", c.notice],
  ];
  list.replaceChildren();
  for (const [k, v] of items) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v === undefined || v === null ? "n/a" : String(v);
    list.append(dt, dd);
  }
  const tbody = $("card-auc").querySelector("tbody");
  tbody.replaceChildren();
  for (const name of Object.keys(c.thresholds)) {
    const row = document.createElement("tr");
    cell(row, name);
    cell(row, fmt((c.val_auc || {})[name], 4));
    const t = test && test.auc ? test.auc[name] : null;
    cell(row, t && t.value !== null ? `${fmt(t.value, 4)}${t.ci ? ` [${fmt(t.ci[0], 3)}, ${fmt(t.ci[1], 3)}]` : ""}` : "n/a");
    tbody.appendChild(row);
    const opt = document.createElement("option"); opt.value = name; opt.textContent = name;
    $("finding").appendChild(opt);
  }
  $("notice").textContent = c.notice;
}

window.addEventListener("DOMContentLoaded", async () => {
  $("file").addEventListener("change", (e) => {
    if (!e.target.files.length) return;
    const file = e.target.files[0];
    e.target.value = "";  // the same file chosen again still fires "change"
    analyse(file);
  });
  $("finding").addEventListener("change", runCam);
  try {
    const response = await fetch("/api/card");
    card = await response.json();
    renderCard(card);
    document.body.dataset.card = "ready";
  } catch (e) { showError(`model card: ${e.message}`); }
});
