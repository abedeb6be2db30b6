// FaceFleet status page: submit a job, follow its events over WebSocket, show the result.
// No build step. The API key stays in sessionStorage (this tab only); the job token is sent in
// the first WebSocket message and in Authorization headers, never in a URL.
"use strict";

const KEY_STORE = "facefleet.apiKey";
const $ = (id) => document.getElementById(id);

function apiKey() { return $("api-key").value.trim(); }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (options.token || apiKey()) headers.Authorization = "Bearer " + (options.token || apiKey());
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  return resp;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (_) {
    return resp.status + " " + resp.statusText;
  }
}

// --- queues ------------------------------------------------------------------------------------

async function refreshQueues() {
  if (!apiKey()) return;
  const resp = await api("/v1/tiers").catch(() => null);
  if (!resp || !resp.ok) return;
  const data = await resp.json();
  const body = $("queues");
  const select = $("tier");
  body.replaceChildren();
  const known = new Set([...select.options].map((o) => o.value));
  for (const t of data.tiers) {
    const tr = document.createElement("tr");
    for (const v of [t.tier, t.ready, t.unacked, t.consumers]) {
      const td = document.createElement("td");
      td.textContent = v === null || v === undefined ? "–" : String(v);
      tr.appendChild(td);
    }
    body.appendChild(tr);
    if (!known.has(t.tier)) {
      const opt = document.createElement("option");
      opt.value = opt.textContent = t.tier;
      select.appendChild(opt);
    }
  }
}

// --- recent jobs of this API key (GET /v1/jobs: only the key's own) ---------------------------

async function refreshJobs() {
  if (!apiKey()) return;
  const resp = await api("/v1/jobs?limit=10").catch(() => null);
  if (!resp) return;
  const body = $("recent-jobs");
  if (!resp.ok) {
    const td = document.createElement("td");
    td.colSpan = 5;
    td.className = "muted";
    td.textContent = "jobs not available: " + (await errorText(resp));
    const tr = document.createElement("tr");
    tr.appendChild(td);
    body.replaceChildren(tr);
    return;
  }
  const data = await resp.json();
  body.replaceChildren();
  for (const j of data.jobs) {
    const tr = document.createElement("tr");
    const created = j.created_at ? new Date(j.created_at).toLocaleTimeString() : "–";
    const gpu = j.gpu_seconds === null || j.gpu_seconds === undefined ? "–" : j.gpu_seconds.toFixed(2);
    const cells = [j.job_id.slice(0, 8), j.state.replace("_", " "), j.tier || "–", created, gpu];
    cells.forEach((v, i) => {
      const td = document.createElement("td");
      td.textContent = v;
      if (i === 0) td.title = j.job_id;
      if (i === 1) td.className = "state " + j.state;
      if (i === 4) td.className = "num";
      tr.appendChild(td);
    });
    body.appendChild(tr);
  }
  if (!data.jobs.length) {
    const td = document.createElement("td");
    td.colSpan = 5;
    td.className = "muted";
    td.textContent = "no jobs yet";
    const tr = document.createElement("tr");
    tr.appendChild(td);
    body.appendChild(tr);
  }
}

function refreshAll() {
  refreshQueues();
  refreshJobs();
}

// --- one job -----------------------------------------------------------------------------------

class JobView {
  constructor(job) {
    this.job = job;
    this.lastSeq = 0;
    this.failures = 0;
    this.done = false;
    $("job-card").hidden = false;
    $("job-id").textContent = job.job_id;
    $("events").replaceChildren();
    $("result").replaceChildren();
    this.setProgress(0, false);
    this.setState("queued");
    $("stage").textContent = "";
    $("eta").textContent = "";
  }

  setState(state) {
    const badge = $("state");
    badge.textContent = state.replace("_", " ");
    badge.className = "badge " + state;
  }

  setProgress(fraction, done) {
    const pct = Math.round(fraction * 100);
    $("progress-fill").style.width = pct + "%";
    $("progress-fill").classList.toggle("done", done);
    $("progress").setAttribute("aria-valuenow", String(pct));
    $("progress-text").textContent = pct + "%";
  }

  connect() {
    // Same origin as the page: the gateway that served the page serves the events.
    const url = new URL(`/v1/jobs/${this.job.job_id}/events`, location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(url);
    ws.onopen = () => ws.send(JSON.stringify({ token: this.job.token, after_seq: this.lastSeq }));
    ws.onmessage = (msg) => this.onEvent(JSON.parse(msg.data));
    ws.onclose = (ev) => this.onClose(ev);
  }

  onClose(ev) {
    if (this.done) return;
    if (ev.code === 1008 || ev.code === 4400) {
      this.log(`refused: ${ev.reason}`);
      this.setState("failed");
      return;
    }
    // Anything else (gateway restart, slow-client close, network): resume after lastSeq.
    this.failures += 1;
    const delay = Math.min(500 * 2 ** this.failures, 10000);
    this.log(`connection closed (${ev.code}${ev.reason ? " " + ev.reason : ""}); resuming in ${delay} ms`);
    setTimeout(() => this.connect(), delay);
  }

  log(text) {
    const li = document.createElement("li");
    li.textContent = text;
    $("events").appendChild(li);
  }

  onEvent(ev) {
    if (ev.seq <= this.lastSeq) return;
    this.lastSeq = ev.seq;
    this.failures = 0;
    const p = ev.payload || {};
    this.log(`#${ev.seq} ${ev.type}${p.fraction !== undefined ? " " + Math.round(p.fraction * 100) + "%" : ""}${p.stage ? " " + p.stage : ""}`);
    switch (ev.type) {
      case "queued": this.setState("queued"); $("stage").textContent = `tier ${p.tier || ""}`; break;
      case "started": this.setState("running"); $("stage").textContent = `on ${p.worker || "a worker"}`; break;
      case "progress":
        this.setState("running");
        this.setProgress(p.fraction || 0, false);
        $("stage").textContent = p.stage || "";
        $("eta").textContent = p.eta_s !== undefined ? `about ${Math.ceil(p.eta_s)} s left` : "";
        break;
      case "retrying": this.setState("retrying"); $("stage").textContent = p.message || ""; break;
      case "replayed":  // `facefleet dead replay` opened the dead-lettered job again
        this.done = false;
        this.setState("queued");
        $("stage").textContent = p.replayed_by ? `replayed by ${p.replayed_by}` : "replayed";
        break;
      case "completed":
        this.done = true;
        this.setState("completed");
        this.setProgress(1, true);
        $("stage").textContent = p.timings_s ? `done in ${Math.max(...Object.values(p.timings_s)).toFixed(1)} s` : "done";
        $("eta").textContent = "";
        this.showResult();
        refreshJobs();
        break;
      default:  // failed, dead_lettered, cancelled
        this.done = true;
        this.setState(ev.type);
        $("stage").textContent = [p.code, p.message].filter(Boolean).join(": ");
        $("eta").textContent = "";
        refreshJobs();
    }
  }

  async showResult() {
    // Through the gateway (?proxy=true): an s3 store's presigned URL is another origin.
    const resp = await api(`/v1/jobs/${this.job.job_id}/result?proxy=true`, { token: this.job.token });
    const box = $("result");
    if (!resp.ok) {
      box.textContent = "result not available: " + (await errorText(resp));
      return;
    }
    const blob = await resp.blob();
    const url = URL.createObjectURL(blob);
    let node;
    if (blob.type.startsWith("image/")) {
      node = document.createElement("img");
      node.alt = "result";
      node.src = url;
    } else if (blob.type.startsWith("video/")) {
      node = document.createElement("video");
      node.controls = true;
      node.src = url;
    } else {
      node = document.createElement("pre");
      node.textContent = await blob.text();
    }
    node.id = "result-media";
    const link = document.createElement("a");
    link.href = url;
    link.download = `facefleet-${this.job.job_id}`;
    link.textContent = "download";
    box.replaceChildren(node, link);
  }
}

// --- wiring ------------------------------------------------------------------------------------

async function submit(event) {
  event.preventDefault();
  const error = $("submit-error");
  error.hidden = true;
  sessionStorage.setItem(KEY_STORE, apiKey());
  const form = new FormData();
  form.append("source", $("source").files[0]);
  form.append("target", $("target").files[0]);
  if ($("tier").value) form.append("tier", $("tier").value);
  form.append("options", $("options").value || "{}");
  $("submit").disabled = true;
  try {
    const resp = await api("/v1/jobs", { method: "POST", body: form });
    if (!resp.ok) {
      const retry = resp.headers.get("Retry-After");
      error.textContent = (await errorText(resp)) + (retry ? ` (retry in ${retry} s)` : "");
      error.hidden = false;
      return;
    }
    new JobView(await resp.json()).connect();
    refreshAll();
  } catch (exc) {
    error.textContent = String(exc);
    error.hidden = false;
  } finally {
    $("submit").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, apiKey());
    refreshAll();
  });
  $("submit-form").addEventListener("submit", submit);
  refreshAll();
  setInterval(refreshAll, 5000);
});
