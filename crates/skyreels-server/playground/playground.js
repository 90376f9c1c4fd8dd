// The playground: a client of the public /api/v3 routes, nothing private. Served with a strict
// Content-Security-Policy (scripts from this origin only), so everything is wired up here.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "skyreels.apiKey";
const HISTORY_STORE = "skyreels.history";
const HISTORY_MAX = 24;
const POLL_MS = 500;
const FINISHED = ["completed", "failed", "cancelled", "deleted"];
const FIELDS = ["num_inference_steps", "guidance_scale", "embedded_guidance_scale", "num_frames", "fps", "width", "height", "flow_shift", "riflex_freq_index"];
// LoRA rows at most, unless the server's schema says fewer (--max-loras)
const MAX_LORA_ROWS = 3;

let model = null; // {model_id, type, api_schema}
let image = null; // the `image` string to submit: an upload's download_url or a URL
let current = null; // the task shown: {id, timer, abort (its event stream's)}
let maxLoras = MAX_LORA_ROWS;

function apiKey() {
  return $("api-key").value.trim();
}

// The key is kept for this tab (sessionStorage); "remember" keeps it on this device as well
// (localStorage), and unticking it forgets it there.
function loadKey() {
  const remembered = localStorage.getItem(KEY_STORE);
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || remembered || "";
  $("remember-key").checked = remembered !== null;
}

function storeKey() {
  const key = apiKey();
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
  if (key && $("remember-key").checked) localStorage.setItem(KEY_STORE, key);
  else localStorage.removeItem(KEY_STORE);
}

function headers(json) {
  const h = {};
  if (apiKey()) h["Authorization"] = "Bearer " + apiKey();
  if (json) h["Content-Type"] = "application/json";
  return h;
}

// Calls an /api/v3 route; resolves to `data`, throws an Error carrying the API's message.
async function api(method, path, body) {
  const init = { method, headers: headers(body !== undefined && !(body instanceof FormData)) };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) init.body = JSON.stringify(body);
  let r;
  try {
    r = await fetch(path, init);
  } catch (e) {
    throw new Error("the server cannot be reached: " + e.message);
  }
  let env = null;
  try {
    env = await r.json();
  } catch (_) {
    throw new Error(`HTTP ${r.status} with a body that is not JSON`);
  }
  if (!r.ok) {
    const err = new Error(env && env.message ? env.message : `HTTP ${r.status}`);
    err.status = r.status;
    throw err;
  }
  return env.data;
}

function showPageError(e) {
  $("page-error").textContent = e ? String(e.message || e) : "";
}

// ---- the model and its defaults ----

async function loadModel() {
  $("server-state").textContent = "";
  try {
    const models = await api("GET", "/api/v3/models");
    model = models[0];
    $("model-id").textContent = model.model_id;
    const props = (model.api_schema.input || {}).properties || {};
    for (const f of FIELDS) {
      const d = props[f] && props[f].default;
      const input = $(f);
      // a field without a fixed default (flow_shift) takes the model's own
      input.placeholder = d === undefined || d === null ? "the model's" : String(d);
    }
    $("image-section").hidden = model.type !== "image-to-video";
    const loras = props.loras || {};
    maxLoras = Math.min(MAX_LORA_ROWS, typeof loras.maxItems === "number" ? loras.maxItems : MAX_LORA_ROWS);
    while ($("loras").children.length > maxLoras) $("loras").lastElementChild.remove();
    updateLoraButton();
    showPageError(null);
    $("run").disabled = false;
  } catch (e) {
    model = null;
    $("run").disabled = true;
    $("server-state").textContent = e.status === 401 ? "this server needs an API key" : "";
    showPageError(e);
  }
}

// ---- the image: file picker, drag and drop, or URL ----

async function useFile(file) {
  if (!file) return;
  image = null;
  const preview = $("image-preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("image-url").value = "";
  $("image-status").textContent = "uploading " + file.name + "...";
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const up = await api("POST", "/api/v3/media/upload/binary", form);
    image = up.download_url;
    $("image-status").textContent = `uploaded ${up.filename} (${up.size} bytes)`;
  } catch (e) {
    $("image-status").textContent = "upload failed: " + e.message;
  }
}

// The page's policy shows images from this origin and data: URLs only (img-src), so a URL
// elsewhere is not previewed.
function previewable(url) {
  try {
    const u = new URL(url, location.href);
    return u.origin === location.origin || u.protocol === "data:";
  } catch (_) {
    return false;
  }
}

function useUrl() {
  const url = $("image-url").value.trim();
  image = url || null;
  const shown = !!url && previewable(url);
  const preview = $("image-preview");
  preview.hidden = !shown;
  if (shown) preview.src = url;
  $("image-status").textContent = !url
    ? ""
    : "the server fetches this URL when the task runs" +
      (shown ? "" : " (no preview: this page shows images from this server only)");
}

// ---- LoRA rows: a path and a scale each ----

function updateLoraButton() {
  $("add-lora").disabled = $("loras").children.length >= maxLoras;
  $("add-lora").textContent = maxLoras === 0 ? "LoRAs are off on this server" : "Add a LoRA";
}

function addLora() {
  if ($("loras").children.length >= maxLoras) return;
  const li = document.createElement("li");
  const field = (className, props, label) => {
    const input = Object.assign(document.createElement("input"), { className }, props);
    input.setAttribute("aria-label", label);
    return input;
  };
  const path = field("lora-path", {
    type: "text",
    spellcheck: false,
    placeholder: "name, https://... or OWNER/REPO/FILE.safetensors",
  }, "LoRA path");
  const scale = field("lora-scale", { type: "number", step: "0.1", min: "-4", max: "4", placeholder: "1" },
    "LoRA scale");
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "remove-lora";
  remove.textContent = "Remove";
  remove.addEventListener("click", () => {
    li.remove();
    updateLoraButton();
  });
  li.append(path, scale, remove);
  $("loras").append(li);
  updateLoraButton();
  path.focus();
}

// The rows with a path, in order: [{path, scale}] (scale left out when empty: the server's 1).
function loraList() {
  const out = [];
  for (const li of $("loras").children) {
    const path = li.querySelector(".lora-path").value.trim();
    if (!path) continue;
    const scale = li.querySelector(".lora-scale").value.trim();
    out.push(scale === "" ? { path } : { path, scale: Number(scale) });
  }
  return out;
}

// ---- submitting and following a task ----

function requestBody() {
  const body = { prompt: $("prompt").value };
  const neg = $("negative-prompt").value.trim();
  if (neg) body.negative_prompt = neg;
  body.seed = Number($("seed").value || -1);
  if (model && model.type === "image-to-video") body.image = image || "";
  for (const f of FIELDS) {
    const v = $(f).value.trim();
    if (v !== "") body[f] = Number(v);
  }
  if ($("aspect_ratio").value) body.aspect_ratio = $("aspect_ratio").value;
  const cache = $("cache").value.trim();
  if (cache) body.cache = cache;
  const gate = $("cfg_gate").value.trim();
  if (gate) body.cfg_gate = Number(gate);
  const loras = loraList();
  if (loras.length) body.loras = loras;
  return body;
}

async function submit(ev) {
  ev.preventDefault();
  $("run").disabled = true;
  try {
    const task = await api("POST", "/api/v3/" + model.model_id, requestBody());
    remember(task);
    follow(task.id);
  } catch (e) {
    showTask(null);
    $("task").hidden = false;
    $("task-error").textContent = e.message;
  } finally {
    $("run").disabled = false;
  }
}

function follow(id) {
  if (current && current.timer) clearTimeout(current.timer);
  if (current && current.abort) current.abort.abort();
  current = { id, timer: null, abort: null };
  $("task").hidden = false;
  $("task-id").textContent = id;
  $("result").hidden = true;
  $("task-error").textContent = "";
  markCurrent();
  stream(id);
}

// Shows the task's live progress from its event stream (read with fetch, so the key travels in a
// header as for every other call); polls /result instead when the stream cannot be opened (e.g.
// the server's --max-event-streams are in use) or ends before the task does.
async function stream(id) {
  const abort = new AbortController();
  current.abort = abort;
  let last = null;
  try {
    const r = await fetch(`/api/v3/predictions/${id}/events`, { headers: headers(false), signal: abort.signal });
    if (r.status === 200 && r.body) {
      document.body.dataset.follow = "events";
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let end;
        while ((end = buf.indexOf("\n\n")) >= 0) {
          const data = buf.slice(0, end).split("\n")
            .filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
          buf = buf.slice(end + 2);
          if (!data) continue; // a keep-alive comment
          last = JSON.parse(data).data;
          if (!current || current.id !== id) return;
          showTask(last);
          updateHistory(last);
        }
      }
    }
  } catch (_) {
    if (abort.signal.aborted) return;
  }
  if (!current || current.id !== id) return;
  current.abort = null;
  if (!last || !FINISHED.includes(last.status)) {
    document.body.dataset.follow = "polling";
    poll();
  }
}

async function poll() {
  const id = current && current.id;
  if (!id) return;
  try {
    const p = await api("GET", `/api/v3/predictions/${id}/result`);
    if (!current || current.id !== id) return;
    showTask(p);
    updateHistory(p);
    if (!FINISHED.includes(p.status)) {
      current.timer = setTimeout(poll, POLL_MS);
    }
  } catch (e) {
    $("task-error").textContent = e.message;
    if (current && current.id === id) current.timer = setTimeout(poll, POLL_MS * 4);
  }
}

function showTask(p) {
  const done = p && FINISHED.includes(p.status);
  $("task-status").textContent = p ? p.status : "";
  $("queue-position").textContent = p && p.queue_position !== null && p.queue_position !== undefined
    ? `(position ${p.queue_position + 1} in the queue)` : "";
  const total = p ? p.progress.total || 1 : 1;
  $("progress").max = total;
  $("progress").value = p ? p.progress.step : 0;
  $("progress-text").textContent = p ? `${p.progress.step}/${p.progress.total} steps` : "";
  $("cancel").hidden = !p || done;
  const start = p && Date.parse(p.started_at || p.created_at);
  const end = p && p.completed_at ? Date.parse(p.completed_at) : Date.now();
  $("elapsed").textContent = start ? `${((end - start) / 1000).toFixed(1)} s` : "";
  $("task-error").textContent = p && p.error ? `${p.error} (code ${p.code})` : "";
  if (p && p.status === "completed" && p.outputs.length) {
    const url = p.outputs[0];
    const video = $("video");
    if (video.getAttribute("src") !== url) video.src = url;
    $("download").href = url;
    $("seed-used").textContent = String(p.seed);
    const list = $("timings");
    list.replaceChildren();
    for (const [stage, value] of Object.entries(p.timings)) {
      const li = document.createElement("li");
      // forwards_computed / forwards_cached / lora_unmatched_keys are counts; the rest are milliseconds
      const count = stage.startsWith("forwards_") || stage === "lora_unmatched_keys";
      li.textContent = count ? `${stage}: ${value}` : `${stage}: ${value} ms`;
      list.append(li);
    }
    $("result").hidden = false;
  } else {
    $("result").hidden = true;
  }
}

async function cancel() {
  if (!current) return;
  try {
    const p = await api("DELETE", `/api/v3/predictions/${current.id}`);
    if (p && p.progress) showTask(p);
    // a task followed by its event stream is told the cancel there
    if (current.abort) return;
    if (current.timer) clearTimeout(current.timer);
    poll();
  } catch (e) {
    $("task-error").textContent = e.message;
  }
}

// ---- this browser's history ----

function history() {
  try {
    const h = JSON.parse(localStorage.getItem(HISTORY_STORE) || "[]");
    return Array.isArray(h) ? h : [];
  } catch (_) {
    return [];
  }
}

function remember(task) {
  const h = history().filter((t) => t.id !== task.id);
  h.unshift({ id: task.id, prompt: $("prompt").value.slice(0, 80), created_at: task.created_at });
  localStorage.setItem(HISTORY_STORE, JSON.stringify(h.slice(0, HISTORY_MAX)));
  renderHistory();
}

function renderHistory() {
  const list = $("history");
  list.replaceChildren();
  for (const t of history()) {
    const li = document.createElement("li");
    li.dataset.id = t.id;
    const thumb = document.createElement("div");
    thumb.className = "placeholder";
    const caption = document.createElement("div");
    caption.className = "caption";
    caption.textContent = t.prompt || t.id;
    const status = document.createElement("div");
    status.className = "status muted";
    li.append(thumb, caption, status);
    li.addEventListener("click", () => follow(t.id));
    list.append(li);
    api("GET", `/api/v3/predictions/${t.id}/result`).then(updateHistory, (e) => {
      status.textContent = e.status === 404 ? "expired" : e.message;
    });
  }
  markCurrent();
}

function updateHistory(p) {
  const li = document.querySelector(`#history li[data-id="${p.id}"]`);
  if (!li) return;
  li.querySelector(".status").textContent = p.status;
  if (p.status === "completed" && p.outputs.length && !li.querySelector("video")) {
    // the first frame of the clip is its thumbnail
    const v = document.createElement("video");
    v.muted = true;
    v.preload = "metadata";
    v.src = p.outputs[0] + "#t=0.001";
    li.replaceChild(v, li.firstChild);
  }
}

function markCurrent() {
  for (const li of document.querySelectorAll("#history li")) {
    li.classList.toggle("current", !!current && li.dataset.id === current.id);
  }
}

// ---- wiring ----

function init() {
  loadKey();
  $("api-key").addEventListener("change", () => {
    storeKey();
    loadModel().then(renderHistory);
  });
  $("remember-key").addEventListener("change", storeKey);
  $("image-file").addEventListener("change", (e) => useFile(e.target.files[0]));
  $("image-url").addEventListener("change", useUrl);
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    useFile(e.dataTransfer.files[0]);
  });
  $("dice").addEventListener("click", () => {
    $("seed").value = "-1";
  });
  $("task-form").addEventListener("submit", submit);
  $("add-lora").addEventListener("click", addLora);
  $("cancel").addEventListener("click", cancel);
  loadModel().then(renderHistory);
}

init();
