// The playground: a client of the server's public protocol only. Tasks go over the Runware WebSocket at /v1
// (authentication, imageUpload, modelSearch, imageInference, getResponse); progress comes from GET /tasks; the
// ranges the page checks come from /openapi.json, the same models the server validates with.
import { apiKey, askForKey, el, formatSeconds, getJSON, modifierName, setApiKey, testModeNotice, uuid4 } from "./common.js";

const MODEL = "runware:kandinsky-5.0-image-lite@1";
const SESSION = "k5serve.session"; // connectionSessionUUID: results that finish during a reload are resumed
const GALLERY = "k5serve.gallery";
const FORM = "k5serve.form";
const MAX_ENTRIES = 60;
const SIZES = [ // the model page's seven sizes
  ["1024x1024", "1:1"], ["640x1408", "9:20"], ["1408x640", "20:9"], ["768x1280", "3:5"],
  ["1280x768", "5:3"], ["896x1152", "7:9"], ["1152x896", "9:7"],
];
const THRESHOLD = { teaCache: "teaCacheDistance", fbCache: "fbCacheThreshold", dbCache: "dbCacheThreshold" };
const THRESHOLD_DEFAULT = { teaCache: 0.5, fbCache: 0.25, dbCache: 0.25 };

// Fallbacks; replaced by what /openapi.json says (load_limits).
const limits = {
  positivePrompt: { min: 2, max: 32000 }, negativePrompt: { min: 2, max: 3000 }, steps: { min: 10, max: 50 },
  CFGScale: { min: 2, max: 10 }, numberResults: { min: 1, max: 20 }, outputQuality: { min: 20, max: 99 },
  ttl: { min: 60, max: 2592000 }, strength: { min: 0, max: 1 }, seed: { min: 0, max: Number.MAX_SAFE_INTEGER },
  weight: { min: -4, max: 4 }, cacheMax: { min: 1, max: 5 }, cacheStart: { min: 0, max: 99 },
  cacheEnd: { min: 1, max: 100 }, dbSkip: { min: 1, max: 50 }, loras: { max: 16 },
  scheduler: ["DPM++ 2M Karras", "DPM++ SDE Karras", "DPM++ 2M SDE Exponential", "DPM++ 2M SDE Karras", "Euler",
    "Euler a", "Euler Trailing", "LCM", "DDIM", "DDPM", "PNDM", "UniPC"],
  outputFormat: ["JPG", "PNG", "WEBP"],
};

const $ = (id) => document.getElementById(id);
const entries = loadGallery(); // newest first
const active = new Map(); // taskUUID -> entry, unfinished
let image = null; // {file, preview, uuid, url}: the chosen input image
let lastSeed = null;
let busy = false; // an input image is being uploaded

// -- the WebSocket connection -------------------------------------------------------------------------------

class Connection {
  constructor() {
    this.ws = null;
    this.ready = false;
    this.waiting = []; // frames to send once authenticated
    this.handlers = new Map(); // taskUUID -> {item(item), error(error)}
    this.retries = 0;
    this.stopped = false;
    this.timer = null;
    this.onReady = () => {};
  }

  connect() {
    this.stopped = false;
    clearTimeout(this.timer);
    const old = this.ws;
    this.ws = null;
    if (old) old.close();
    this.ready = false;
    const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1`);
    this.ws = ws;
    status("connecting", "connecting…");
    ws.onopen = () => {
      const auth = { taskType: "authentication", apiKey: apiKey() || "playground" };
      const session = sessionStorage.getItem(SESSION);
      if (session) auth.connectionSessionUUID = session;
      ws.send(JSON.stringify([auth]));
    };
    ws.onmessage = (event) => {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      this.receive(frame);
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.ready = false;
      // 4001: another connection resumed this session (a duplicated tab): work on a session of our own;
      // unfinished tasks are caught up with getResponse after the reconnect.
      if (event.code === 4001) sessionStorage.removeItem(SESSION);
      if (this.stopped) return;
      status("offline", "reconnecting…");
      this.timer = setTimeout(() => this.connect(), Math.min(10000, 500 * 2 ** this.retries++));
    };
  }

  receive(frame) {
    for (const item of frame.data || []) {
      if (item.taskType === "authentication") {
        sessionStorage.setItem(SESSION, item.connectionSessionUUID);
        this.ready = true;
        this.retries = 0;
        status("connected", "connected");
        for (const tasks of this.waiting.splice(0)) this.ws.send(JSON.stringify(tasks));
        this.onReady();
      } else if (item.taskUUID && this.handlers.has(item.taskUUID)) {
        this.handlers.get(item.taskUUID).item(item);
      }
    }
    for (const error of frame.errors || []) {
      if (error.code === "invalidApiKey") this.refused(error);
      else if (error.taskUUID && this.handlers.has(error.taskUUID)) this.handlers.get(error.taskUUID).error(error);
      else showError("_task", error.message);
    }
  }

  async refused(error) {
    this.stopped = true;
    this.ws?.close();
    status("refused", "API key needed");
    const had = apiKey();
    const key = await askForKey(had ? `${error.message} (invalidApiKey)` : "This server asks for an API key.");
    if (key) {
      setApiKey(key);
      this.connect();
    }
  }

  send(tasks) {
    if (this.ready && this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(tasks));
    else this.waiting.push(tasks);
  }

  on(taskUUID, handler) {
    this.handlers.set(taskUUID, handler);
  }

  off(taskUUID) {
    this.handlers.delete(taskUUID);
  }

  // One task answered by one item (imageUpload, modelSearch): -> Promise of the item; rejects with the error.
  request(task) {
    return new Promise((resolve, reject) => {
      this.on(task.taskUUID, {
        item: (item) => { this.off(task.taskUUID); resolve(item); },
        error: (error) => { this.off(task.taskUUID); reject(error); },
      });
      this.send([task]);
    });
  }
}

const conn = new Connection();

function status(state, text) {
  const pill = $("connection");
  pill.dataset.state = state;
  pill.textContent = text;
}

// -- limits from /openapi.json ------------------------------------------------------------------------------

function bounds(property) {
  const out = {};
  for (const part of [property, ...(property?.anyOf || [])]) {
    if (!part) continue;
    if (part.minimum !== undefined) out.min = part.minimum;
    if (part.maximum !== undefined) out.max = part.maximum;
    if (part.minLength !== undefined) out.min = part.minLength;
    if (part.maxLength !== undefined) out.max = part.maxLength;
    if (part.maxItems !== undefined) out.maxItems = part.maxItems;
    if (part.enum) out.enum = part.enum;
  }
  return out;
}

async function loadLimits() {
  try {
    const schemas = (await (await fetch("/openapi.json")).json()).components.schemas;
    const task = schemas.ImageInferenceTask.properties;
    const accel = schemas.AcceleratorOptions.properties;
    for (const name of ["positivePrompt", "negativePrompt", "steps", "CFGScale", "numberResults", "outputQuality",
      "ttl", "strength", "seed"]) Object.assign(limits[name], bounds(task[name]));
    limits.seed.max = Math.min(limits.seed.max, Number.MAX_SAFE_INTEGER); // a JavaScript number stays exact
    Object.assign(limits.weight, bounds(schemas.LoraItem.properties.weight));
    Object.assign(limits.cacheMax, bounds(accel.cacheMaxConsecutiveSteps));
    Object.assign(limits.cacheStart, bounds(accel.cacheStartStepPercentage));
    Object.assign(limits.cacheEnd, bounds(accel.cacheEndStepPercentage));
    Object.assign(limits.dbSkip, bounds(accel.dbCacheSkipInterval));
    limits.loras.max = bounds(task.lora).maxItems ?? limits.loras.max;
    limits.scheduler = bounds(task.scheduler).enum || limits.scheduler;
    limits.outputFormat = bounds(task.outputFormat).enum || limits.outputFormat;
  } catch {
    // the fallbacks above are the model page's own ranges
  }
}

function applyLimits() {
  const set = (id, { min, max }) => {
    if (min !== undefined) $(id).min = min;
    if (max !== undefined) $(id).max = max;
  };
  set("steps", limits.steps);
  set("CFGScale", limits.CFGScale);
  set("numberResults", limits.numberResults);
  set("outputQuality", limits.outputQuality);
  set("ttl", limits.ttl);
  set("strength", limits.strength);
  set("seed", limits.seed);
  set("cacheMax", limits.cacheMax);
  set("cacheStart", limits.cacheStart);
  set("cacheEnd", limits.cacheEnd);
  set("dbSkip", limits.dbSkip);
  for (const name of limits.scheduler) $("scheduler").append(el("option", { value: name, text: name }));
  for (const name of limits.outputFormat) $("outputFormat").append(el("option", { value: name, text: name }));
  const sizes = $("sizes");
  for (const [size, ratio] of [...SIZES, ["match", "match input"]]) {
    const [w, h] = size === "match" ? [0, 0] : size.split("x").map(Number);
    const shape = el("span", { class: "shape" });
    if (w) {
      shape.style.width = `${Math.round((w / 1408) * 36)}px`;
      shape.style.height = `${Math.round((h / 1408) * 36)}px`;
    }
    const label = el("label", { class: "size", title: w ? `${w}×${h}` : "the input image's aspect ratio" },
      el("input", { type: "radio", name: "size", value: size, "data-param": "size", checked: size === "1024x1024" }),
      shape, el("span", { class: "ratio", text: ratio }), el("span", { class: "dims", text: w ? `${w}×${h}` : "" }));
    if (size === "match") label.classList.add("match");
    sizes.append(label);
  }
}

// -- the form -----------------------------------------------------------------------------------------------

function radio(name) {
  return document.querySelector(`input[name="${name}"]:checked`)?.value;
}

function setRadio(name, value) {
  const input = document.querySelector(`input[name="${name}"][value="${CSS.escape(String(value))}"]`);
  if (input) input.checked = true;
}

function readForm() {
  return {
    positivePrompt: $("positivePrompt").value, negativePrompt: $("negativePrompt").value, size: radio("size"),
    steps: $("steps").value, CFGScale: $("CFGScale").value, seedMode: radio("seedMode"), seed: $("seed").value,
    scheduler: $("scheduler").value, numberResults: $("numberResults").value, imageMode: radio("imageMode"),
    image: image && image.uuid ? { uuid: image.uuid, url: image.url } : null, strength: $("strength").value,
    loras: [...document.querySelectorAll("#loras .lora")].map((row) => ({
      model: row.dataset.model, weight: row.querySelector("input").value })),
    cacheMethod: $("cacheMethod").value, cacheThreshold: $("cacheThreshold").value, cacheStart: $("cacheStart").value,
    cacheEnd: $("cacheEnd").value, cacheMax: $("cacheMax").value, dbSkip: $("dbSkip").value,
    outputFormat: $("outputFormat").value, outputQuality: $("outputQuality").value, ttl: $("ttl").value,
    includeCost: $("includeCost").checked, safety: $("safety").checked,
  };
}

function fillForm(s) {
  $("positivePrompt").value = s.positivePrompt ?? "";
  $("negativePrompt").value = s.negativePrompt ?? "";
  setRadio("size", s.size || "1024x1024");
  $("steps").value = s.steps ?? 20;
  $("CFGScale").value = s.CFGScale ?? 7;
  setRadio("seedMode", s.seedMode || "random");
  $("seed").value = s.seed ?? "";
  $("scheduler").value = s.scheduler || "";
  $("numberResults").value = s.numberResults ?? 1;
  setRadio("imageMode", s.imageMode || "none");
  setImage(s.image ? { uuid: s.image.uuid, url: s.image.url, preview: s.image.url } : null);
  $("strength").value = s.strength ?? 0.8;
  $("loras").replaceChildren();
  for (const lora of s.loras || []) addLora(lora.model, lora.weight);
  $("cacheMethod").value = s.cacheMethod || "";
  $("cacheThreshold").value = s.cacheThreshold ?? 0.5;
  $("cacheStart").value = s.cacheStart ?? "";
  $("cacheEnd").value = s.cacheEnd ?? "";
  $("cacheMax").value = s.cacheMax ?? 3;
  $("dbSkip").value = s.dbSkip ?? 5;
  $("outputFormat").value = s.outputFormat || "JPG";
  $("outputQuality").value = s.outputQuality ?? 95;
  $("ttl").value = s.ttl ?? "";
  $("includeCost").checked = !!s.includeCost;
  $("safety").checked = !!s.safety;
  refreshForm();
}

function refreshForm() {
  for (const id of ["steps", "CFGScale", "strength", "outputQuality", "cacheThreshold"]) $(`${id}-out`).textContent = $(id).value;
  for (const id of ["positivePrompt", "negativePrompt"]) {
    const { min, max } = limits[id];
    $(`${id}-count`).textContent = `${$(id).value.length} / ${max}` + (id === "negativePrompt" ? "" : ` (at least ${min})`);
  }
  $("seed").disabled = radio("seedMode") !== "fixed";
  const mode = radio("imageMode");
  $("strength-row").hidden = mode !== "seed";
  $("drop").hidden = mode === "none";
  $("clear-image").hidden = mode === "none" || !image;
  $("image-input-state").textContent = mode === "none" ? "none" : mode === "edit" ? "editing" : "image-to-image";
  document.querySelector(".size.match").hidden = mode === "none";
  if (mode === "none" && radio("size") === "match") setRadio("size", "1024x1024");
  const method = $("cacheMethod").value;
  $("cache-options").hidden = !method;
  $("skip-interval-box").hidden = method !== "dbCache";
  $("cache-state").textContent = method ? $("cacheMethod").selectedOptions[0].text : "off";
  $("output-state").textContent = [$("outputFormat").value, $("includeCost").checked && "cost",
    $("safety").checked && "safety"].filter(Boolean).join(" · ");
  const count = document.querySelectorAll("#loras .lora").length;
  $("lora-state").textContent = count ? `${count} applied` : $("lora-pick").disabled ? "none on this server" : "";
  sessionStorage.setItem(FORM, JSON.stringify(readForm()));
}

// The page's own check, against the ranges the server enforces: -> [[field, message], ...]
function check(s) {
  const problems = [];
  const range = (field, value, { min, max }, what, integer = true) => {
    const n = Number(value);
    if (value === "" || !Number.isFinite(n) || (integer && !Number.isInteger(n)) || n < min || n > max) {
      problems.push([field, `${what}: ${integer ? "a whole number" : "a number"} from ${min} to ${max}.`]);
    }
  };
  const prompt = limits.positivePrompt;
  if (s.positivePrompt.length < prompt.min || s.positivePrompt.length > prompt.max) {
    problems.push(["positivePrompt", `The prompt takes ${prompt.min} to ${prompt.max} characters (it has ${s.positivePrompt.length}).`]);
  }
  const negative = limits.negativePrompt;
  if (s.negativePrompt && (s.negativePrompt.length < negative.min || s.negativePrompt.length > negative.max)) {
    problems.push(["negativePrompt", `The negative prompt takes ${negative.min} to ${negative.max} characters, or none.`]);
  }
  range("steps", s.steps, limits.steps, "Steps");
  range("CFGScale", s.CFGScale, limits.CFGScale, "CFG scale", false);
  range("numberResults", s.numberResults, limits.numberResults, "Images");
  if (s.seedMode === "fixed") range("seed", s.seed, limits.seed, "Seed");
  range("outputQuality", s.outputQuality, limits.outputQuality, "Quality");
  if (s.ttl !== "") range("ttl", s.ttl, limits.ttl, "Keep images for");
  if (s.imageMode !== "none" && !image) problems.push(["image", "Choose an image, or set the image input to none."]);
  if (s.imageMode === "seed") range("strength", s.strength, limits.strength, "Strength", false);
  if (s.size === "match" && s.imageMode === "none") problems.push(["size", "Choose a size."]);
  if (s.loras.length > limits.loras.max) problems.push(["lora", `At most ${limits.loras.max} LoRAs.`]);
  if (s.cacheMethod) {
    range("cacheThreshold", s.cacheThreshold, { min: 0, max: 1 }, "Threshold", false);
    range("acceleratorOptions.cacheMaxConsecutiveSteps", s.cacheMax, limits.cacheMax, "Max consecutive");
    if (s.cacheStart !== "") range("acceleratorOptions.cacheStartStepPercentage", s.cacheStart, limits.cacheStart, "Window start");
    if (s.cacheEnd !== "") range("acceleratorOptions.cacheEndStepPercentage", s.cacheEnd, limits.cacheEnd, "Window end");
    if (s.cacheStart !== "" && s.cacheEnd !== "" && Number(s.cacheStart) >= Number(s.cacheEnd)) {
      problems.push(["acceleratorOptions.cacheEndStepPercentage", "The window must end after it starts."]);
    }
    if (s.cacheMethod === "dbCache") range("acceleratorOptions.dbCacheSkipInterval", s.dbSkip, limits.dbSkip, "Skip interval");
  }
  return problems;
}

function buildTask(s, taskUUID) {
  const task = {
    taskType: "imageInference", taskUUID, model: MODEL, positivePrompt: s.positivePrompt, steps: Number(s.steps),
    CFGScale: Number(s.CFGScale), numberResults: Number(s.numberResults), outputType: "URL",
    outputFormat: s.outputFormat, outputQuality: Number(s.outputQuality), includeCost: s.includeCost,
  };
  if (s.negativePrompt) task.negativePrompt = s.negativePrompt;
  if (s.size && s.size !== "match") [task.width, task.height] = s.size.split("x").map(Number);
  if (s.seedMode === "fixed") task.seed = Number(s.seed);
  if (s.scheduler) task.scheduler = s.scheduler;
  if (s.ttl !== "") task.ttl = Number(s.ttl);
  if (s.safety) task.safety = { checkContent: true };
  if (s.loras.length) task.lora = s.loras.map(({ model, weight }) => ({ model, weight: Number(weight) }));
  if (s.cacheMethod) {
    const options = { [s.cacheMethod]: true, [THRESHOLD[s.cacheMethod]]: Number(s.cacheThreshold),
      cacheMaxConsecutiveSteps: Number(s.cacheMax) };
    if (s.cacheStart !== "") options.cacheStartStepPercentage = Number(s.cacheStart);
    if (s.cacheEnd !== "") options.cacheEndStepPercentage = Number(s.cacheEnd);
    if (s.cacheMethod === "dbCache") options.dbCacheSkipInterval = Number(s.dbSkip);
    task.acceleratorOptions = options;
  }
  if (s.imageMode === "edit" && s.image) task.inputs = { referenceImages: [s.image.uuid] };
  if (s.imageMode === "seed" && s.image) {
    task.seedImage = s.image.uuid;
    task.strength = Number(s.strength);
  }
  return task;
}

// -- errors next to their parameter -------------------------------------------------------------------------

// The form field a server error's `parameter` names ("lora[0].weight" -> the LoRA section, ...).
function fieldFor(parameter) {
  if (!parameter) return "_task";
  const p = parameter.replace(/\[\d+\]/g, "");
  if (p === "width" || p === "height") return "size";
  if (/^(inputs(\.|$)|referenceImages|seedImage|maskImage)/.test(p)) return "image";
  if (p.startsWith("lora")) return "lora";
  if (/^acceleratorOptions\.(teaCacheDistance|fbCacheThreshold|dbCacheThreshold)$/.test(p)) return "cacheThreshold";
  if (p.startsWith("safety") || p === "checkNSFW") return "safety";
  if (document.querySelector(`.field-error[data-for="${CSS.escape(p)}"]`)) return p;
  if (p.startsWith("acceleratorOptions")) return "acceleratorOptions";
  return "_task";
}

function showError(field, message) {
  const slot = document.querySelector(`.field-error[data-for="${CSS.escape(field)}"]`) || $("form-error");
  slot.textContent = message;
  const details = slot.closest("details");
  if (details) details.open = true;
  const input = document.querySelector(`[data-param="${CSS.escape(field)}"]`);
  if (input) input.setAttribute("aria-invalid", "true");
}

// The field an error slot belongs to, to focus: its input, the chosen size, the drop area, the LoRA picker.
function fieldOf(slot) {
  const name = slot.dataset.for;
  if (name === "size") return document.querySelector('input[name="size"]:checked') || document.querySelector('input[name="size"]');
  if (name === "image") return $("drop").hidden ? document.querySelector('input[name="imageMode"]:checked') : $("drop");
  if (name === "lora") return $("lora-pick");
  if (name === "_task") return $("positivePrompt");
  return document.querySelector(`[data-param="${CSS.escape(name)}"]`);
}

// Scroll to the first error in the form (in page order) with its message in view, and focus its field.
function revealFirstError() {
  const slot = [...document.querySelectorAll("#form .field-error")].find((s) => s.textContent);
  if (!slot) return;
  const field = fieldOf(slot);
  if (field && !field.disabled) field.focus({ preventScroll: true });
  const label = field?.id ? document.querySelector(`label[for="${CSS.escape(field.id)}"]`) : null;
  // its label, its field, then the message, each scrolled into view as needed: the message wins if not all fit
  for (const target of [label, field?.closest(".size, .drop, fieldset") || field, slot]) {
    target?.scrollIntoView({ block: "nearest" });
  }
}

function clearErrors() {
  for (const slot of document.querySelectorAll(".field-error")) slot.textContent = "";
  for (const input of document.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}

function serverError(error) {
  showError(fieldFor(error.parameter), `${error.message} (${error.code})`);
}

// -- image input --------------------------------------------------------------------------------------------

function setImage(next) {
  if (image?.preview?.startsWith("blob:")) URL.revokeObjectURL(image.preview);
  image = next;
  $("preview").hidden = !image;
  $("drop-text").hidden = !!image;
  if (image) $("preview").src = image.preview;
  else $("preview").removeAttribute("src");
  if (image && radio("imageMode") === "none") setRadio("imageMode", "edit");
  refreshForm();
}

function chooseFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    showError("image", `${file.name} is not an image.`);
    return;
  }
  setImage({ file, preview: URL.createObjectURL(file), uuid: null, url: null });
}

async function uploadImage(chosen) {
  const data = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(chosen.file);
  });
  const item = await conn.request({ taskType: "imageUpload", taskUUID: uuid4(), image: data });
  chosen.uuid = item.imageUUID; // this image's, even if another was chosen meanwhile
  chosen.url = item.imageURL;
}

// -- LoRA ---------------------------------------------------------------------------------------------------

async function loadLoras() {
  const pick = $("lora-pick");
  const found = [];
  try {
    for (let total = 1; found.length < total && found.length < 1000;) {
      const item = await conn.request({ taskType: "modelSearch", taskUUID: uuid4(), category: "lora", limit: 100,
        offset: found.length });
      if (!item.results.length) break;
      found.push(...item.results);
      total = item.totalResults;
    }
  } catch {
    // no list: LoRA requests are still checked by the server
  }
  pick.replaceChildren(...found.map((m) => el("option", { value: m.air, text: m.name })));
  pick.disabled = $("lora-add").disabled = pick.options.length === 0;
  if (pick.disabled) pick.append(el("option", { text: "no LoRA folder on this server (--lora-dir)" }));
  refreshForm();
}

function addLora(model, weight = 1) {
  const value = el("output", { text: String(weight) });
  const slider = el("input", { type: "range", min: limits.weight.min, max: limits.weight.max, step: 0.05,
    value: weight, "aria-label": `${model} weight`, oninput: () => { value.textContent = slider.value; refreshForm(); } });
  const row = el("div", { class: "lora", "data-model": model }, el("span", { class: "lora-name", text: model }),
    slider, value, el("button", { type: "button", class: "link", text: "remove",
      onclick: () => { row.remove(); refreshForm(); } }));
  $("loras").append(row);
  refreshForm();
}

// -- generating and the gallery -----------------------------------------------------------------------------

async function generate() {
  if (busy) return;
  clearErrors();
  const settings = readForm();
  if (!$("skip-checks").checked) {
    const problems = check(settings);
    if (problems.length) {
      for (const [field, message] of problems) showError(field, message);
      revealFirstError();
      return;
    }
  }
  if (settings.imageMode !== "none" && image && !image.uuid) {
    const chosen = image;
    busy = $("generate").disabled = true;
    try {
      await uploadImage(chosen);
    } catch (error) {
      showError("image", `Uploading the image failed: ${error.message || error} (${error.code || "error"})`);
      return;
    } finally {
      busy = $("generate").disabled = false;
    }
    settings.image = { uuid: chosen.uuid, url: chosen.url };
    refreshForm();
  }
  const taskUUID = uuid4();
  const entry = { taskUUID, settings, created: Date.now(), images: [], status: "queued", step: 0,
    steps: Number(settings.steps) || 0, done: false };
  entries.unshift(entry);
  for (const dropped of entries.splice(MAX_ENTRIES)) forget(dropped);
  track(entry);
  conn.send([buildTask(settings, taskUUID)]);
  saveGallery();
  renderGallery();
}

function track(entry) {
  active.set(entry.taskUUID, entry);
  conn.on(entry.taskUUID, { item: (item) => received(entry, item), error: (error) => failed(entry, error) });
  pollProgress();
}

function forget(entry) {
  active.delete(entry.taskUUID);
  conn.off(entry.taskUUID);
}

function received(entry, item) {
  if (item.status === "processing") {
    if (typeof item.progress === "number" && entry.status !== "running") entry.step = Math.round(item.progress * entry.steps / 100);
    if (entry.resumed) setTimeout(() => !entry.done && conn.send([{ taskType: "getResponse", taskUUID: entry.taskUUID }]), 1000);
    return renderProgress(entry);
  }
  if (!item.imageUUID || entry.images.some((i) => i.imageUUID === item.imageUUID)) return;
  const [w, h] = entry.settings.size && entry.settings.size !== "match" ? entry.settings.size.split("x").map(Number) : [];
  entry.images.push({ imageUUID: item.imageUUID, imageURL: item.imageURL, seed: item.seed, width: item.width || w,
    height: item.height || h, cost: item.cost, nsfw: item.NSFWContent, seconds: (Date.now() - entry.created) / 1000 });
  lastSeed = item.seed;
  if (entry.images.length >= Number(entry.settings.numberResults)) {
    finish(entry, "done");
    measured(entry);
  }
  saveGallery();
  renderEntry(entry);
}

function failed(entry, error) {
  if (entry.done && entry.status === "done") return;
  // Asked for right after it was sent (a reload, a reconnect): its record may not exist yet.
  if (entry.resumed && error.code === "taskFailedOrNotFound" && (entry.misses = (entry.misses || 0) + 1) <= 5) {
    setTimeout(() => !entry.done && conn.send([{ taskType: "getResponse", taskUUID: entry.taskUUID }]), 1000);
    return;
  }
  const wasLatest = latestEntry() === entry;
  entry.error = { code: error.code, message: error.message, parameter: error.parameter };
  finish(entry, "error");
  serverError(error);
  saveGallery();
  if (wasLatest) renderGallery(); // the task before it is shown large again
  else renderEntry(entry);
  if (entries[0] === entry && !entry.resumed && Date.now() - entry.created < 15000) revealFirstError();
}

function finish(entry, how) {
  entry.status = how;
  entry.done = true;
  entry.seconds = (Date.now() - entry.created) / 1000;
  forget(entry);
}

// Progress of this page's tasks from GET /tasks (step k of N, or the place in the queue), while any is active.
let polling = false;
async function pollProgress() {
  if (polling) return;
  polling = true;
  try {
    while (active.size) {
      const { status, body } = await getJSON("/tasks").catch(() => ({ status: 0, body: null }));
      if (status === 200 && body) {
        for (const row of body.tasks) {
          for (const entry of active.values()) {
            if (!entry.taskUUID.startsWith(row.id)) continue;
            timeSteps(entry, row);
            Object.assign(entry, { status: row.status, step: row.step, steps: row.steps, position: row.position });
            renderProgress(entry);
          }
        }
      }
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
  } finally {
    polling = false;
  }
}

// The step times: when the task was first seen running (t0 at step s0) and when its current step was first
// seen (tStep); wall-clock milliseconds, so they survive a reload with the gallery.
function timeSteps(entry, row) {
  if (row.status !== "running") return;
  const now = Date.now();
  if (entry.t0 === undefined || entry.status !== "running" || row.step < entry.s0) {
    entry.t0 = entry.tStep = now;
    entry.s0 = row.step;
  } else if (row.step !== entry.step) {
    entry.tStep = now;
  }
}

// Seconds left: the mean time of the steps seen so far times the steps to go, less the time the current step
// has run; null until a step has been timed.
function secondsLeft(entry) {
  const timed = entry.step - entry.s0;
  if (!(timed > 0) || !entry.steps) return null;
  const perStep = (entry.tStep - entry.t0) / timed;
  return Math.max(0, (perStep * (entry.steps - entry.step) - (Date.now() - entry.tStep)) / 1000);
}

function progressText(entry) {
  if (entry.status === "error") return entry.error ? `failed: ${entry.error.message} (${entry.error.code})` : "failed";
  if (entry.status === "done") return `done in ${formatSeconds(entry.seconds || 0)}`;
  if (entry.status === "running") {
    const left = secondsLeft(entry);
    const eta = left === null ? "estimating time left" : left < 0.5 ? "finishing…" : `about ${formatSeconds(left)} left`;
    return `step ${entry.step} of ${entry.steps} · ${eta}`;
  }
  return entry.position ? `queued · position ${entry.position}` : "queued";
}

function renderProgress(entry) {
  const card = document.querySelector(`.task[data-task="${entry.taskUUID}"]`);
  if (!card) return;
  const fraction = entry.done ? 1 : entry.steps ? entry.step / entry.steps : 0;
  card.querySelector(".bar").style.width = `${Math.round(fraction * 100)}%`;
  card.querySelector(".progress").setAttribute("aria-valuenow", String(Math.round(fraction * 100)));
  card.querySelector(".state").textContent = progressText(entry);
  card.dataset.status = entry.status;
  if (entries[0] === entry) $("foot-status").textContent = `Newest: ${progressText(entry)}`;
}

function describe(s) {
  const size = s.size === "match" ? "input size" : (s.size || "").replace("x", "×");
  return [size, `${s.steps} steps`, `CFG ${s.CFGScale}`, s.scheduler, s.imageMode === "edit" && "edit",
    s.imageMode === "seed" && `img2img ${s.strength}`, s.loras?.length && `${s.loras.length} LoRA`,
    s.cacheMethod].filter(Boolean).join(" · ");
}

function fileName(img) {
  return img.imageURL.split("?")[0].split("/").pop();
}

// The newest task is shown large, each image with its seed, size and time, Download and Reuse; older tasks as
// thumbnails (a click opens the viewer, which has the same actions).
function renderEntry(entry) {
  if (!entries.includes(entry)) return; // cleared from the gallery
  const latest = latestEntry() === entry;
  const old = document.querySelector(`.task[data-task="${entry.taskUUID}"]`);
  const tiles = entry.images.map((img) => {
    const picture = el("img", { src: img.imageURL, alt: entry.settings.positivePrompt, loading: latest ? "eager" : "lazy",
      width: img.width, height: img.height });
    picture.addEventListener("error", () => { img.expired = true; tile.classList.add("expired"); saveGallery(); });
    const facts = [`seed ${img.seed}`, img.width && `${img.width}×${img.height}`, formatSeconds(img.seconds),
      img.cost !== undefined && img.cost !== null && `$${Number(img.cost).toFixed(4)}`].filter(Boolean).join(" · ");
    const actions = latest && !img.expired ? el("span", { class: "actions" },
      el("a", { class: "download", href: img.imageURL, download: fileName(img), text: "Download" }),
      el("button", { type: "button", class: "reuse", text: "Reuse settings", title: "Put these settings and this seed back into the form",
        onclick: () => reuse(entry, img) })) : null;
    const tile = el("figure", { class: `tile${img.expired ? " expired" : ""}` },
      el("button", { type: "button", class: "open", title: "View full size", onclick: () => view(entry, img) }, picture),
      el("figcaption", {}, el("span", { class: "facts" }, facts,
        img.nsfw === true ? el("span", { class: "badge nsfw", text: "NSFW" }) : null,
        img.nsfw === false ? el("span", { class: "badge", text: "safe" }) : null), actions));
    return tile;
  });
  const [w, h] = sizeOf(entry);
  for (let i = entry.images.length; !entry.done && i < Number(entry.settings.numberResults); i++) {
    const placeholder = el("div", { class: "placeholder" });
    if (w && h) placeholder.style.setProperty("--ratio", String(w / h));
    tiles.push(el("figure", { class: "tile pending" }, placeholder));
  }
  const card = el("article", { class: `task${latest ? " latest" : ""}`, "data-task": entry.taskUUID, "data-status": entry.status },
    el("header", {}, el("p", { class: "prompt", text: entry.settings.positivePrompt }),
      el("p", { class: "muted small", text: describe(entry.settings) })),
    el("div", { class: "progress", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100" },
      el("div", { class: "bar" })),
    el("p", { class: "state small" }),
    el("div", { class: "tiles" }, ...tiles));
  if (old) old.replaceWith(card);
  else $("gallery").prepend(card);
  renderProgress(entry);
  $("empty").hidden = entries.length > 0;
}

// The task shown large: the newest one that has not failed without images (a refused task leaves the last
// images large).
function latestEntry() {
  return entries.find((entry) => entry.status !== "error" || entry.images.length);
}

// The size a task asked for, or its input image's: -> [width, height] (or []).
function sizeOf(entry) {
  if (entry.settings.size && entry.settings.size !== "match") return entry.settings.size.split("x").map(Number);
  return entry.images[0]?.width ? [entry.images[0].width, entry.images[0].height] : [];
}

function renderGallery() {
  $("gallery").replaceChildren();
  $("foot-status").textContent = "";
  for (const entry of [...entries].reverse()) renderEntry(entry);
  $("empty").hidden = entries.length > 0;
}

function loadGallery() {
  try {
    return JSON.parse(sessionStorage.getItem(GALLERY)) || [];
  } catch {
    return [];
  }
}

function saveGallery() {
  try {
    sessionStorage.setItem(GALLERY, JSON.stringify(entries));
  } catch {
    // storage full: the gallery still shows, it just won't survive a reload
  }
}

// After a reload or a reconnect, unfinished tasks' results come from the resumed session or, when the session
// was gone (away longer than the server's resume window), from getResponse.
function catchUp() {
  for (const entry of active.values()) {
    entry.resumed = true;
    conn.send([{ taskType: "getResponse", taskUUID: entry.taskUUID }]);
  }
}

// The test-mode notice says what a task took here, once one has finished.
function measured(entry) {
  const slot = $("test-mode-time");
  if (!slot) return;
  const n = entry.images.length;
  const [w, h] = sizeOf(entry);
  slot.textContent = `(the last task here: ${formatSeconds(entry.seconds)} for ${n === 1 ? "1 image" : `${n} images`}`
    + ` at ${entry.steps} steps${w ? `, ${w}×${h}` : ""})`;
}

// -- the image viewer ---------------------------------------------------------------------------------------

let viewing = null;
function view(entry, img) {
  viewing = { entry, img };
  $("viewer-img").src = img.imageURL;
  $("viewer-img").alt = entry.settings.positivePrompt;
  $("viewer-info").textContent = `${entry.settings.positivePrompt} — seed ${img.seed}, ${describe(entry.settings)}`;
  $("viewer-download").href = img.imageURL;
  $("viewer-download").download = fileName(img);
  $("viewer").showModal();
}

// Every setting of that task back into the form, with the seed fixed to that image's.
function reuse(entry, img) {
  fillForm({ ...entry.settings, seedMode: "fixed", seed: String(img.seed) });
  if ($("viewer").open) $("viewer").close();
  $("positivePrompt").focus();
  $("positivePrompt").scrollIntoView({ block: "nearest" });
}

// -- start --------------------------------------------------------------------------------------------------

async function start() {
  $("mod-key").textContent = modifierName();
  getJSON("/ready").then(({ body }) => {
    if (!body) return;
    $("model").textContent = body.tiny_weights ? "Kandinsky 5.0 Image Lite · tiny test weights" : "Kandinsky 5.0 Image Lite";
    testModeNotice(body);
    const last = entries.find((entry) => entry.status === "done");
    if (last) measured(last);
  });
  await loadLimits();
  applyLimits();
  const saved = sessionStorage.getItem(FORM);
  if (saved) {
    try {
      fillForm(JSON.parse(saved));
    } catch {
      refreshForm();
    }
  } else {
    refreshForm();
  }
  $("form").addEventListener("input", refreshForm);
  $("form").addEventListener("change", refreshForm);
  $("form").addEventListener("submit", (event) => { event.preventDefault(); generate(); });
  document.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key === "Enter" && !document.querySelector("dialog[open]")) {
      event.preventDefault();
      generate();
    }
  });
  $("lock-seed").addEventListener("click", () => {
    const seed = lastSeed ?? entries.find((e) => e.images.length)?.images.at(-1).seed;
    if (seed === undefined || seed === null) return showError("seed", "No image yet: generate one first.");
    setRadio("seedMode", "fixed");
    $("seed").value = seed;
    refreshForm();
  });
  $("file").addEventListener("change", () => chooseFile($("file").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    chooseFile(event.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") $("file").click(); });
  $("clear-image").addEventListener("click", () => { $("file").value = ""; setImage(null); });
  $("lora-add").addEventListener("click", () => {
    const model = $("lora-pick").value;
    if (model && !document.querySelector(`#loras .lora[data-model="${CSS.escape(model)}"]`)) addLora(model);
  });
  $("cacheMethod").addEventListener("change", () => {
    const method = $("cacheMethod").value;
    if (method) $("cacheThreshold").value = THRESHOLD_DEFAULT[method];
    refreshForm();
  });
  $("viewer-reuse").addEventListener("click", () => reuse(viewing.entry, viewing.img));
  $("foot-status").addEventListener("click", () => document.querySelector("#gallery .task")?.scrollIntoView({ block: "start" }));
  $("viewer-close").addEventListener("click", () => $("viewer").close());
  $("clear-gallery").addEventListener("click", () => {
    const unfinished = entries.filter((entry) => !entry.done); // still coming: kept
    entries.splice(0, entries.length, ...unfinished);
    saveGallery();
    renderGallery();
  });
  $("change-key").addEventListener("click", async () => {
    const key = await askForKey("Enter the API key to use with this server.");
    if (key !== null) {
      setApiKey(key);
      conn.ws?.close();
      conn.connect();
    }
  });
  renderGallery();
  for (const entry of entries) if (!entry.done) track(entry); // from before a reload
  let first = true;
  conn.onReady = () => {
    if (first) loadLoras();
    first = false;
    catchUp();
  };
  conn.connect();
}

start();
