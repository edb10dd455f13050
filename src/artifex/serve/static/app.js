// Artifex web page: plain JS, no build step. Talks only to its own origin.
// The token stays in this origin's localStorage and goes out only in the Authorization header of
// same-origin requests; videos are fetched with it and shown from blob: URLs (never a token in a URL).
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "artifex.token";
let token = localStorage.getItem(TOKEN_KEY) || "";
let authRequired = true;
let models = [];
let watching = null; // AbortController of the current progress stream
let videoUrl = null;

function headers() {
  return authRequired && token ? { Authorization: "Bearer " + token } : {};
}

class ApiFailure extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    let text = e.message || ("HTTP " + status);
    if (e.allowed) text += " (allowed: " + e.allowed + ")";
    super(text);
    this.status = status;
    this.body = body;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) },
                                       credentials: "same-origin" });
  if (response.status === 401) {
    showTokenBox("The token was not accepted.");
    throw new ApiFailure(401, await response.json().catch(() => null));
  }
  if (!response.ok) throw new ApiFailure(response.status, await response.json().catch(() => null));
  return response;
}

function showError(err) { $("error").textContent = err ? String(err.message || err) : ""; }

function showTokenBox(message) {
  $("token-box").hidden = false;
  $("app").hidden = true;
  if (message) showError(message);
}

async function start() {
  const info = await (await fetch("/api/info")).json();
  authRequired = info.auth_required;
  if (authRequired && !token) { showTokenBox(); return; }
  try {
    await loadModels();
  } catch (err) {
    return;
  }
  $("token-box").hidden = true;
  $("app").hidden = false;
  refreshQueue();
  refreshWorkers();
  setInterval(refreshQueue, 2000);
  setInterval(refreshWorkers, 3000);
  setInterval(refreshReady, 3000);
  refreshReady();
}

async function refreshReady() {
  const r = await fetch("/readyz").then((x) => x.json()).catch(() => null);
  const badge = $("ready");
  if (!r) { badge.textContent = "unreachable"; badge.className = "badge"; return; }
  badge.textContent = r.ready ? "ready" : "warming up: " + Object.entries(r.models).map(
    ([m, v]) => m + " " + v.status).join(", ");
  badge.className = "badge " + (r.ready ? "ready" : "waiting");
  $("startup").textContent = startupText(r.models);
}

function seconds(s) { return s.toFixed(2) + " s"; }

// Each model's load (with the part that imported the libraries) and warm-up time, as the server measured them
// (the slowest of its workers).
function startupText(byModel) {
  return Object.entries(byModel).map(([m, v]) => {
    if (v.load_s == null) return m + ": " + v.status;
    const warm = v.warmup_s != null ? "warm-up " + seconds(v.warmup_s) : v.status === "ready" ? "no warm-up"
      : v.status;
    const imports = v.imports_s != null ? " (imports " + seconds(v.imports_s) + ")" : "";
    return m + ": load " + seconds(v.load_s) + imports + ", " + warm;
  }).join(" · ");
}

async function loadModels() {
  const data = await (await api("/api/models")).json();
  models = data.models;
  const select = $("model");
  select.innerHTML = "";
  for (const m of models) {
    const o = document.createElement("option");
    o.value = m.name;
    o.textContent = m.name + " (" + m.task + ")";
    select.appendChild(o);
  }
  onModelChange();
}

function currentModel() { return models.find((m) => m.name === $("model").value); }

function onModelChange() {
  const m = currentModel();
  if (!m) return;
  $("image-label").hidden = m.image === "none";
  $("image-need").textContent = m.image === "required" ? "(required)" : "(optional)";
  $("image").required = m.image === "required";
  // speech-to-video: the audio (required) and a pose video (optional); the frames are whole clips
  $("audio-label").hidden = m.audio !== "required";
  $("audio").required = m.audio === "required";
  $("pose-label").hidden = m.pose_video === "none" || !m.pose_video;
  const clip = m.clip_frames; // [first clip's frames, frames per later clip], or null
  $("frames").min = clip ? String(clip[0]) : "1";
  $("frames").step = clip ? String(clip[1]) : "4";
  $("frames").placeholder = clip ? "the audio's length" : "";
  const size = $("size");
  size.innerHTML = "";
  const def = document.createElement("option");
  def.value = "";
  def.textContent = "preset / default";
  size.appendChild(def);
  for (const s of m.sizes) {
    const o = document.createElement("option");
    o.value = s;
    o.textContent = s;
    size.appendChild(o);
  }
  $("defaults").textContent = "defaults: " + m.defaults.steps + " steps (" + m.defaults.sampler + "), guidance " +
    m.defaults.guidance.join("/") + ", " + m.defaults.frames + " frames, " +
    m.defaults.width + "x" + m.defaults.height + " at " + m.fps + " fps" + (m.weights ? "; needs " + m.weights : "") +
    (clip ? "; with audio, frames follow it: " + clip[0] + " for the first clip, " + clip[1] + " per further clip" : "");
  $("guidance-low-label").hidden = m.defaults.guidance.length < 2;
  const turbo = $("preset").querySelector('option[value="turbo"]');
  turbo.disabled = !m.presets.turbo;
  if (turbo.disabled && $("preset").value === "turbo") $("preset").value = "";
  const lora = $("lora");
  lora.innerHTML = "";
  for (const name of m.loras) {
    const o = document.createElement("option");
    o.value = name === "default" ? "" : name;
    o.textContent = name;
    lora.appendChild(o);
  }
}

async function submit(event) {
  event.preventDefault();
  showError(null);
  const form = new FormData();
  const set = (name, value) => { if (value !== "" && value != null) form.append(name, value); };
  set("model", $("model").value);
  set("prompt", $("prompt").value);
  set("negative_prompt", $("negative").value);
  set("preset", $("preset").value);
  set("size", $("size").value);
  set("frames", $("frames").value);
  set("steps", $("steps").value);
  set("seed", $("seed").value);
  set("sampler", $("sampler").value);
  set("timesteps", $("timesteps").value);
  set("guidance", $("guidance").value);
  if (!$("guidance-low-label").hidden) set("guidance_low", $("guidance-low").value);
  set("lora", $("lora").value);
  const file = $("image").files[0];
  if (file && !$("image-label").hidden) form.append("image", file);
  const audio = $("audio").files[0];
  if (audio && !$("audio-label").hidden) form.append("audio", audio);
  const pose = $("pose-video").files[0];
  if (pose && !$("pose-label").hidden) form.append("pose_video", pose);
  $("submit").disabled = true;
  try {
    const job = await (await api("/api/jobs", { method: "POST", body: form })).json();
    watch(job);
    refreshQueue();
  } catch (err) {
    showError(err);
  } finally {
    $("submit").disabled = false;
  }
}

function showJob(job) {
  $("current").hidden = false;
  $("job-id").textContent = job.id;
  $("job-state").textContent = job.state;
  const p = job.progress || {};
  const bar = $("progress");
  if (p.percent != null) bar.value = p.percent;
  bar.dataset.updates = String(Number(bar.dataset.updates) + 1);
  let text = p.stage || "";
  if (p.stage === "denoise" && p.total) text += " " + p.step + "/" + p.total;
  if (job.state === "queued" && job.queue_position != null) text += " (position " + job.queue_position + ")";
  if (job.eta_s != null && job.state !== "succeeded") text += " · ETA " + job.eta_s.toFixed(1) + " s";
  $("progress-text").textContent = text;
  $("job-detail").textContent = job.error ? job.error.message : "";
  // speech-to-video: the audio's length and the clips it makes, as the server measured them
  const st = job.settings || {};
  const audioInfo = $("job-audio");
  audioInfo.hidden = st.audio_seconds == null;
  if (st.audio_seconds != null) {
    audioInfo.textContent = "audio: " + st.audio_seconds.toFixed(1) + " s → " + st.clips + " clip" +
      (st.clips === 1 ? "" : "s") + ", " + st.frames + " frames (" + ((st.frames - 1) / st.fps).toFixed(2) +
      " s of video)" + (job.pose_video_sha256 ? " · with a pose video" : "");
  }
  $("cancel").hidden = !(job.state === "queued" || job.state === "running");
}

async function watch(job) {
  if (watching) watching.abort();
  const controller = new AbortController();
  watching = controller;
  $("progress").dataset.updates = "0";
  $("result").hidden = true;
  showJob(job);
  if (!(job.state === "queued" || job.state === "running")) {
    if (job.state === "succeeded") showVideo(job.id);
    return;
  }
  try {
    const response = await api("/api/jobs/" + job.id + "/events", { signal: controller.signal });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let name = "message";
        let data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).trim();
        }
        if (!data) continue;
        const update = JSON.parse(data);
        if (name === "progress" || name === "done") showJob(update);
        if (name === "done") {
          if (update.state === "succeeded") showVideo(update.id);
          refreshQueue();
          return;
        }
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") showError(err);
  }
}

// The picked audio file's length, read by the browser (the server measures it again on submit).
function onAudioPicked() {
  const file = $("audio").files[0];
  const out = $("audio-picked");
  out.textContent = "";
  if (!file) return;
  const url = URL.createObjectURL(file);
  const probe = new Audio();
  probe.preload = "metadata";
  probe.addEventListener("loadedmetadata", () => {
    if (Number.isFinite(probe.duration)) out.textContent = probe.duration.toFixed(1) + " s of audio";
    URL.revokeObjectURL(url);
  });
  probe.addEventListener("error", () => {
    out.textContent = "this browser cannot read it; the server will decode it";
    URL.revokeObjectURL(url);
  });
  probe.src = url;
}

async function showVideo(id) {
  try {
    const blob = await (await api("/api/jobs/" + id + "/video")).blob();
    if (videoUrl) URL.revokeObjectURL(videoUrl);
    videoUrl = URL.createObjectURL(blob);
    const video = $("result-video");
    video.muted = false; // speech-to-video results carry their audio: play it
    video.src = videoUrl;
    video.dataset.job = id;
    const link = $("download");
    link.href = videoUrl;
    link.download = id + ".mp4";
    $("result").hidden = false;
  } catch (err) {
    showError(err);
  }
}

async function cancelCurrent() {
  const id = $("job-id").textContent;
  if (!id) return;
  try {
    showJob(await (await api("/api/jobs/" + id + "/cancel", { method: "POST" })).json());
  } catch (err) {
    showError(err);
  }
}

// A table row of text cells.
function tableRow(cells) {
  const tr = document.createElement("tr");
  for (const text of cells) {
    const td = document.createElement("td");
    td.textContent = text;
    tr.appendChild(td);
  }
  return tr;
}

const JOBS_SHOWN = 15;

// The newest jobs of any state, and how many there are of each (the table shows only the newest).
async function refreshQueue() {
  let data;
  try {
    data = await (await api("/api/jobs?limit=" + JOBS_SHOWN)).json();
  } catch (err) {
    return;
  }
  $("queue-summary").textContent = jobsSummary(data);
  const body = $("queue").querySelector("tbody");
  body.innerHTML = "";
  for (const job of data.jobs) {
    const pct = job.progress && job.progress.percent != null ? job.progress.percent.toFixed(0) + "%" : "";
    const tr = tableRow([job.id.slice(0, 14) + "…", job.model, job.state, pct, (job.settings.prompt || "").slice(0, 60)]);
    tr.dataset.id = job.id;
    tr.className = "clickable";
    tr.addEventListener("click", () => watch(job));
    body.appendChild(tr);
  }
}

function jobsSummary(data) {
  const counts = data.counts || {};
  const parts = ["queued", "running", "succeeded", "failed", "cancelled", "expired"]
    .filter((state) => counts[state]).map((state) => counts[state] + " " + state);
  const shown = data.jobs.length < data.total ? "the " + data.jobs.length + " newest of " : "";
  return data.total ? shown + data.total + " jobs: " + parts.join(", ") : "no jobs yet";
}

function gib(bytes) { return (bytes / 2 ** 30).toFixed(1); }

// Where the engines run (this process, or Ray actors) and each one's state, GPU memory and load.
async function refreshWorkers() {
  let data;
  try {
    data = await (await api("/api/workers")).json();
  } catch (err) {
    return;
  }
  const ex = data.executor;
  const text = ex.kind === "ray" ? "Ray cluster " + (ex.address || "") + " · " + ex.nodes + " node(s) · dashboard: " +
    (ex.dashboard || "not running") : "engines in the server's own process";
  $("executor").textContent = text;
  const body = $("workers").querySelector("tbody");
  body.innerHTML = "";
  for (const w of data.workers) {
    const r = w.report || {};
    const gpus = (r.gpus || []).map((g) => gib(g.used_bytes) + "/" + gib(g.total_bytes) + " GiB" +
      (g.utilization_percent != null ? " " + g.utilization_percent + "%" : "")).join(", ");
    const memory = gpus || (r.rss_bytes != null ? "CPU, " + gib(r.rss_bytes) + " GiB resident" : "");
    const cells = [w.model, String(w.index) + (w.pid ? " (pid " + w.pid + ")" : ""), w.status +
      (w.restarts ? " · " + w.restarts + " restart(s)" : ""), w.current_job ? w.current_job.slice(0, 14) + "…" : "idle",
      String(w.jobs_done), w.node || "", memory, r.loadavg_1m != null ? String(r.loadavg_1m) : "",
      w.load_s != null ? seconds(w.load_s) : "", w.warmup_s != null ? seconds(w.warmup_s) : ""];
    body.appendChild(tableRow(cells));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    localStorage.setItem(TOKEN_KEY, token);
    showError(null);
    start();
  });
  $("gen-form").addEventListener("submit", submit);
  $("model").addEventListener("change", onModelChange);
  $("audio").addEventListener("change", onAudioPicked);
  $("cancel").addEventListener("click", cancelCurrent);
  start().catch(showError);
});
