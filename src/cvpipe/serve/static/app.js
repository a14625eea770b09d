// cvpipe web page: upload -> POST /predict -> top-k bars ("not sure" when the server abstains); GET /model -> model card.
"use strict";
const $ = (id) => document.getElementById(id);
let limits = { max_upload_bytes: 10 * 1024 * 1024 };

function showMessage(text, busy) {
  const m = $("message");
  m.textContent = text;
  m.className = busy ? "message busy" : "message";
  m.hidden = !text;
}

function pct(p) { return (100 * p).toFixed(1) + " %"; }

async function classify(file) {
  if (!file) return;
  $("result").hidden = true;
  $("predicted-label").textContent = "";
  $("verdict").classList.remove("unsure");
  if (file.size > limits.max_upload_bytes) {
    showMessage(`Rejected: ${file.name} is ${file.size} bytes; the limit is ${limits.max_upload_bytes} bytes.`);
    return;
  }
  showMessage(`Classifying ${file.name}…`, true);
  const body = new FormData();
  body.append("file", file, file.name);
  let resp, data;
  try {
    resp = await fetch("/predict", { method: "POST", body });
    data = await resp.json();
  } catch (err) {
    showMessage(`The server could not be reached: ${err}`);
    return;
  }
  if (!resp.ok) {
    showMessage(`Rejected (${resp.status} ${data.error || ""}): ${data.detail || "unknown error"}`);
    return;
  }
  showMessage("");
  $("preview").src = URL.createObjectURL(file);
  if (data.unsure) {  // label is null: the calibrated top-1 probability is below serve.abstain_below
    $("verdict").classList.add("unsure");
    $("predicted-label").textContent = "not sure";
    $("predicted-prob").textContent = `(best guess ${data.top_k[0].label} at ${pct(data.probability)}, ` +
      `below the ${pct(data.abstain_below)} threshold)`;
  } else {
    $("predicted-label").textContent = data.label;
    $("predicted-prob").textContent = `(${pct(data.probability)})`;
  }
  const bars = $("bars");
  bars.replaceChildren();
  for (const t of data.top_k) {
    const li = document.createElement("li");
    li.className = "topk";
    li.innerHTML = `<span class="label"></span><span class="bar"><span class="fill"></span></span><span class="prob"></span>`;
    li.querySelector(".label").textContent = t.label;
    li.querySelector(".fill").style.width = (100 * t.probability).toFixed(1) + "%";
    li.querySelector(".prob").textContent = pct(t.probability);
    bars.appendChild(li);
  }
  const l = data.latency_ms;
  $("latency").textContent = `${data.image.format} ${data.image.width}×${data.image.height} · ` +
    `server ${l.total.toFixed(1)} ms (decode ${l.decode.toFixed(1)}, model ${l.inference.toFixed(1)})`;
  $("result").hidden = false;
}

function row(tbody, key, value) {
  const tr = document.createElement("tr");
  const th = document.createElement("th"); th.textContent = key;
  const td = document.createElement("td"); td.textContent = value;
  tr.append(th, td); tbody.appendChild(tr);
}

async function loadCard() {
  let m;
  try { m = await (await fetch("/model")).json(); } catch (err) { $("model-summary").textContent = `cannot load /model: ${err}`; return; }
  $("model-summary").textContent = `${m.arch} · ${m.num_classes} classes (${m.classes.slice(0, 12).join(", ")}${m.num_classes > 12 ? ", …" : ""}) · ` +
    `input ${m.preprocess.image_size}px ${m.preprocess.resize_mode}`;
  const tbody = $("metrics").querySelector("tbody");
  const tm = m.test_metrics;
  if (tm) {
    if (tm.accuracy !== undefined) row(tbody, "test accuracy", tm.accuracy.toFixed(4));
    if (tm.macro_f1 !== undefined) row(tbody, "test macro-F1", tm.macro_f1.toFixed(4));
    if (tm.n_test !== undefined) row(tbody, "test images", tm.n_test);
  } else {
    row(tbody, "test metrics", "not available");
  }
  if (m.data_version) row(tbody, "data version", m.data_version);
  if (m.trained_epochs) row(tbody, "trained epochs", m.trained_epochs);
  if (m.model_cost) row(tbody, "model cost", Object.entries(m.model_cost).map(([k, v]) => `${k} ${v}`).join(", "));
  if (m.backend) row(tbody, "served by", m.backend.name + (m.backend.file ? ` (${m.backend.file})` : ""));
  const ab = m.abstain;
  if (ab) {
    row(tbody, "temperature", ab.temperature === null ? "unknown" : `${ab.temperature} (${ab.source})`);
    if (ab.enabled) {
      const e = ab.expected;  // evaluate's test coverage/error at this threshold, when the card has them
      let seen = "";
      if (e && typeof e.coverage === "number") {
        seen = ` (test: answers ${pct(e.coverage)}` + (typeof e.error === "number" ? `, error ${pct(e.error)} on those)` : ")");
      }
      row(tbody, "not sure below", pct(ab.abstain_below) + seen);
    }
  }
  $("metrics").hidden = false;
  if (m.confusion_matrix_url) {
    $("confusion").src = m.confusion_matrix_url; $("confusion").hidden = false;
  } else {
    $("confusion-missing").textContent = "No confusion matrix for this model."; $("confusion-missing").hidden = false;
  }
  const lb = $("leaderboard");
  if (m.leaderboard && m.leaderboard.length) {
    const cols = Object.keys(m.leaderboard[0]);
    const t = document.createElement("table");
    const head = t.createTHead().insertRow();
    cols.forEach((c) => { const th = document.createElement("th"); th.textContent = c; head.appendChild(th); });
    const b = t.createTBody();
    m.leaderboard.forEach((r) => { const tr = b.insertRow(); cols.forEach((c) => { tr.insertCell().textContent = r[c]; }); });
    lb.replaceChildren(t);
  } else if (m.leaderboard_md) {
    const pre = document.createElement("pre"); pre.textContent = m.leaderboard_md; lb.replaceChildren(pre);
  } else {
    lb.innerHTML = '<p class="muted">No leaderboard (run <code>cvpipe compare</code> and serve <code>models/best/</code>).</p>';
  }
  $("params").textContent = JSON.stringify(m.params_summary, null, 2);
  const notes = $("notes");
  (m.notes || []).forEach((n) => { const li = document.createElement("li"); li.textContent = n; notes.appendChild(li); });
}

function setup() {
  const zone = $("dropzone"), input = $("file-input");
  input.addEventListener("change", () => classify(input.files[0]));
  ["dragenter", "dragover"].forEach((e) => zone.addEventListener(e, (ev) => { ev.preventDefault(); zone.classList.add("over"); }));
  ["dragleave", "drop"].forEach((e) => zone.addEventListener(e, (ev) => { ev.preventDefault(); zone.classList.remove("over"); }));
  zone.addEventListener("drop", (ev) => { const f = ev.dataTransfer.files[0]; if (f) classify(f); });
  zone.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") input.click(); });
  fetch("/config.json").then((r) => r.json()).then((c) => { limits = c; }).catch(() => {});
  loadCard();
}
document.addEventListener("DOMContentLoaded", setup);
