// sdlab's page: plain JS over the same /sdapi/v1 API that A1111 clients use.
"use strict";

const API = "/sdapi/v1";
const KEY_STORAGE = "sdlab.apiKey";
const $ = (id) => document.getElementById(id);

let initImage = null; // data: URL of the img2img input, or null for txt2img
let polling = null;

// --- talking to the server -----------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem(KEY_STORAGE);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, body) {
  const options = { headers: headers() };
  if (body !== undefined) {
    options.method = "POST";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(API + path, options);
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const message = (data && (data.message || data.detail)) || response.statusText;
    const error = new Error(response.status === 401 ? "API key needed: " + message : message);
    error.status = response.status;
    throw error;
  }
  return data;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

// --- settings from the server ----------------------------------------------------------------

async function loadSettings() {
  try {
    const [samplers, models, options] = await Promise.all(
      [api("/samplers"), api("/sd-models"), api("/options")]);
    fillSelect($("sampler"), samplers.map((s) => s.name));
    fillSelect($("model"), models.map((m) => m.title));
    $("model").value = options.sd_model_checkpoint;
    applyDefaults(options.sdlab_model_defaults || {});
    setStatus("ready");
  } catch (e) {
    setStatus(e.message, true);
  }
}

function fillSelect(select, names) {
  select.replaceChildren(...names.map((name) => new Option(name, name)));
}

function applyDefaults(d) {
  if (d.sampler_name) $("sampler").value = d.sampler_name;
  if (d.steps) setSlider("steps", d.steps);
  if (d.cfg_scale !== undefined) setSlider("cfg", d.cfg_scale);
  if (d.width) $("width").value = d.width;
  if (d.height) $("height").value = d.height;
}

function setSlider(id, value) {
  $(id).value = value;
  $(id + "-value").textContent = $(id).value;
}

async function switchModel() {
  const title = $("model").value;
  setStatus("loading " + title + " ...");
  try {
    await api("/options", { sd_model_checkpoint: title });
    const options = await api("/options");
    applyDefaults(options.sdlab_model_defaults || {});
    setStatus("model: " + options.sd_model_checkpoint);
  } catch (e) {
    setStatus(e.message, true);
  }
}

// --- generating ----------------------------------------------------------------------------

function request() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value,
    sampler_name: $("sampler").value || null,
    steps: Number($("steps").value),
    cfg_scale: Number($("cfg").value),
    width: Number($("width").value),
    height: Number($("height").value),
    seed: Number($("seed").value),
    batch_size: Number($("batch-size").value),
  };
  if (initImage) {
    body.init_images = [initImage];
    body.denoising_strength = Number($("strength").value);
  }
  return body;
}

async function generate(event) {
  event.preventDefault();
  const body = request();
  const mode = initImage ? "img2img" : "txt2img";
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  setStatus("generating (" + mode + ") ...");
  startPolling();
  try {
    const result = await api("/" + mode, body);
    const info = JSON.parse(result.info);
    result.images.forEach((b64, i) => addToGallery(b64, info.infotexts[i] || "", info));
    setStatus((info.interrupted ? "interrupted: " : "done: ") + result.images.length + " image(s)");
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    stopPolling();
    $("generate").disabled = false;
    $("interrupt").disabled = true;
  }
}

function startPolling() {
  $("progress").value = 0;
  polling = setInterval(pollProgress, 400);
}

function stopPolling() {
  clearInterval(polling);
  polling = null;
  $("progress").value = 0;
  $("progress-text").textContent = "";
  $("live-preview").hidden = true;
}

async function pollProgress() {
  try {
    const p = await api("/progress");
    if (!polling) return;
    $("progress").value = p.progress;
    const s = p.state;
    $("progress-text").textContent = s.sampling_steps
      ? `step ${s.sampling_step}/${s.sampling_steps}` + (s.queue_size ? `, ${s.queue_size} waiting` : "")
      : (s.queue_size ? `${s.queue_size} waiting` : "");
    if (p.current_image) {
      $("live-preview").src = "data:image/png;base64," + p.current_image;
      $("live-preview").hidden = false;
    }
  } catch (e) {
    // a missed poll is not worth reporting; the request itself reports errors
  }
}

async function interrupt() {
  try {
    await api("/interrupt", {});
  } catch (e) {
    setStatus(e.message, true);
  }
}

// --- gallery and img2img ---------------------------------------------------------------------

function addToGallery(b64, infotext, info) {
  const src = "data:image/png;base64," + b64;
  const figure = document.createElement("figure");
  figure.className = "item";
  const img = document.createElement("img");
  img.src = src;
  img.alt = infotext.split("\n")[0] || "generated image";
  const caption = document.createElement("figcaption");
  const params = document.createElement("pre");
  params.className = "params";
  params.textContent = infotext + (info.interrupted ? "\n(interrupted)" : "");
  const send = document.createElement("button");
  send.type = "button";
  send.className = "send-to-img2img";
  send.textContent = "Send to img2img";
  send.addEventListener("click", () => {
    setInitImage(src);
    $("controls").scrollIntoView({ behavior: "smooth" });
  });
  const save = document.createElement("a");
  save.href = src;
  save.download = "sdlab-" + (infotext.match(/Seed: (\d+)/) || ["", "image"])[1] + ".png";
  save.textContent = "Download";
  caption.append(params, send, save);
  figure.append(img, caption);
  $("gallery").prepend(figure);
}

function setInitImage(dataUrl) {
  initImage = dataUrl;
  $("init-preview").src = dataUrl || "";
  $("init-box").hidden = !dataUrl;
  if (!dataUrl) $("init-file").value = "";
  $("generate").textContent = dataUrl ? "Generate (img2img)" : "Generate";
}

function readInitFile() {
  const file = $("init-file").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => setInitImage(reader.result);
  reader.readAsDataURL(file);
}

// --- wiring ----------------------------------------------------------------------------------

function init() {
  $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    loadSettings();
  });
  for (const id of ["steps", "cfg", "strength"]) {
    $(id).addEventListener("input", () => { $(id + "-value").textContent = $(id).value; });
  }
  $("model").addEventListener("change", switchModel);
  $("init-file").addEventListener("change", readInitFile);
  $("clear-init").addEventListener("click", () => setInitImage(null));
  $("controls").addEventListener("submit", generate);
  $("interrupt").addEventListener("click", interrupt);
  loadSettings();
}

init();
