// Label review page: one key per action so a person reviews hundreds of suspects in minutes.
// State comes from GET /api/review/suspects; every decision is a POST (or DELETE for undo) whose answer
// updates the row in place, so the page never shows a decision the server did not record.
"use strict";
const $ = (id) => document.getElementById(id);
let rows = [], classes = [], pos = 0;

$("reviewer").value = localStorage.getItem("cvpipe-reviewer") || "";
$("reviewer").addEventListener("change", () => localStorage.setItem("cvpipe-reviewer", $("reviewer").value.trim()));

function say(text) { const m = $("message"); m.textContent = text || ""; m.hidden = !text; }

function describe(d) {
  if (!d) return "";
  return d.action === "relabel" ? `relabel → ${d.label}` : d.action;
}

function renderList() {
  const body = document.querySelector("#list tbody");
  body.replaceChildren(...rows.map((r, i) => {
    const tr = document.createElement("tr");
    tr.dataset.id = r.id;
    if (i === pos) tr.className = "current";
    for (const v of [r.rank, r.id, r.given_label, r.suggested_label, describe(r.decision)]) {
      const td = document.createElement("td"); td.textContent = v; tr.appendChild(td);
    }
    tr.addEventListener("click", () => { pos = i; render(); });
    return tr;
  }));
}

function render() {
  const done = rows.filter((r) => r.decision).length;
  $("progress").textContent = `${done} / ${rows.length} reviewed`;
  $("figure").hidden = rows.length === 0;
  if (rows.length) {
    const r = rows[pos];
    $("image").src = `/api/review/image/${encodeURIComponent(r.id)}`;
    $("rank").textContent = r.rank;
    $("suspect-id").textContent = r.id;
    $("split").textContent = r.split ? `(${r.split})` : "";
    $("given").textContent = r.given_label;
    $("suggested").textContent = r.suggested_label;
    const conf = parseFloat(r.self_confidence);
    $("confidence").textContent = isNaN(conf) ? "" : `confidence in the given label ${conf.toFixed(3)}`;
    $("decision").textContent = describe(r.decision);
    $("decision").className = "decision " + (r.decision ? r.decision.action : "");
  }
  renderList();
  const cur = document.querySelector("#list tr.current");
  if (cur) cur.scrollIntoView({ block: "nearest" });
}

async function load() {
  const res = await fetch("/api/review/suspects");
  const body = await res.json();
  if (!res.ok) { say(`${body.error}: ${body.detail}`); $("progress").textContent = "nothing to review"; return; }
  rows = body.suspects; classes = body.classes;
  $("classes").replaceChildren(...classes.slice(0, 9).map((c) => {
    const li = document.createElement("li"); li.textContent = c; return li;
  }));
  const first = rows.findIndex((r) => !r.decision);
  pos = first < 0 ? 0 : first;
  render();
}

function nextUndecided() {
  for (let k = 1; k <= rows.length; k++) {
    const i = (pos + k) % rows.length;
    if (!rows[i].decision) return i;
  }
  return Math.min(pos + 1, rows.length - 1);
}

async function decide(action, label) {
  const r = rows[pos];
  const res = await fetch("/api/review/decisions", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ id: r.id, action, label, reviewer: $("reviewer").value.trim() }),
  });
  const body = await res.json();
  if (!res.ok) { say(`${body.error}: ${body.detail}`); return; }
  say("");
  r.decision = body;
  pos = nextUndecided();
  render();
}

async function undo() {
  const r = rows[pos];
  const res = await fetch(`/api/review/decisions/${encodeURIComponent(r.id)}`, { method: "DELETE" });
  const body = await res.json();
  if (!res.ok) { say(`${body.error}: ${body.detail}`); return; }
  say("");
  r.decision = null;
  render();
}

// keys are handled one after another: a key pressed while a decision is in flight acts on the suspect the
// page moves to next, never twice on the same one
let queue = Promise.resolve();
function act(fn) { queue = queue.then(fn).catch((e) => say(String(e))); }

document.addEventListener("keydown", (ev) => {
  if (ev.target.tagName === "INPUT" || ev.ctrlKey || ev.metaKey || ev.altKey || !rows.length) return;
  const k = ev.key;
  if (k === "k") act(() => decide("keep"));
  else if (k === "a") act(() => decide("relabel", rows[pos].suggested_label));
  else if (k === "x") act(() => decide("exclude"));
  else if (k === "u") act(undo);
  else if (k >= "1" && k <= "9" && classes[+k - 1] !== undefined) act(() => decide("relabel", classes[+k - 1]));
  else if (k === "j" || k === "ArrowDown" || k === "ArrowRight") act(() => { pos = Math.min(pos + 1, rows.length - 1); render(); });
  else if (k === "ArrowUp" || k === "ArrowLeft") act(() => { pos = Math.max(pos - 1, 0); render(); });
  else return;
  ev.preventDefault();
});

load().catch((e) => say(String(e)));
