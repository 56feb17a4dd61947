// The queue view: /ready (model, device, readiness) and GET /tasks (what is queued and running), every 2 s.
import { askForKey, el, formatSeconds, getJSON, setApiKey, testModeNotice } from "./common.js";

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 2000;
let asking = false;
let declined = false; // cancelled the key dialog: not asked again until "API key" is clicked

function fact(name, value) {
  return value === undefined || value === null || value === "" ? null
    : el("div", {}, el("dt", { text: name }), el("dd", { text: String(value) }));
}

function gib(bytes) {
  return bytes ? `${(bytes / 2 ** 30).toFixed(1)} GiB` : null;
}

function showReady(body, status) {
  const pill = $("readiness");
  if (!body) {
    pill.dataset.state = "offline";
    pill.textContent = "server unreachable";
    return;
  }
  testModeNotice(body);
  pill.dataset.state = body.ready ? "ready" : "unready";
  pill.textContent = body.ready ? "ready" : `not ready (${status})`;
  $("reasons").hidden = !body.reasons;
  $("reasons").textContent = (body.reasons || []).join("; ");
  const replicas = Array.isArray(body.replicas) ? body.replicas : null;
  const device = body.device || (replicas && [...new Set(replicas.map((r) => r.device))].join(", "));
  $("facts").replaceChildren(...[
    fact("Model", body.model === "loaded" ? (body.model_path || "loaded") : body.model),
    fact("Weights", body.tiny_weights === undefined ? null : body.tiny_weights ? "tiny test weights" : "real"),
    fact("Device", device),
    fact("Data type", body.dtype),
    fact("Replicas", replicas ? replicas.length : null),
    fact("Queue", body.queue === undefined ? null : `${body.queue} of ${body.queueLimit ?? "∞"}`),
    fact("GPU memory", gib(body.gpuMemoryBytes?.allocated)),
    fact("Editing model", body.i2i_model ? (body.i2i_loaded ? "loaded" : "loads on first use") : body.i2i_model === null ? "none" : null),
    fact("LoRA folder", body.lora_dir === null ? "none" : body.lora_dir),
    fact("Image store", body.imageStore ? `${body.imageStore.kind}${body.imageStore.reachable === false ? " (unreachable)" : ""}` : null),
    fact("Database", body.database ? `${body.database.kind}${body.database.reachable ? "" : " (unreachable)"}` : null),
    fact("Up", body.uptimeSeconds === undefined ? null : formatSeconds(body.uptimeSeconds)),
  ].filter(Boolean));
}

function showTasks(body) {
  $("counts").textContent = `${body.running} running · ${body.queued} queued · ${body.imagesGenerated} images generated · `
    + `${body.tasksCompleted} tasks done, ${body.tasksFailed} failed`;
  $("tasks").replaceChildren(...body.tasks.map((task) => {
    const bar = el("div", { class: "bar" });
    bar.style.width = `${task.steps ? Math.round((100 * task.step) / task.steps) : 0}%`;
    return el("tr", { "data-id": task.id, "data-status": task.status },
      el("td", {}, el("code", { text: task.id }), task.tenant ? ` · ${task.tenant}` : ""),
      el("td", { text: task.status === "running" ? "running" : `queued · position ${task.position}` }),
      el("td", {}, el("div", { class: "progress" }, bar), ` step ${task.step} of ${task.steps}`),
      el("td", { class: "hide-narrow", text: `${task.width}×${task.height}` }),
      el("td", { class: "hide-narrow", text: String(task.numberResults) }),
      el("td", { text: formatSeconds(task.seconds) }));
  }));
  $("idle").hidden = body.tasks.length > 0;
}

async function needKey(message, asked = false) {
  if (asking || (declined && !asked)) return;
  asking = true;
  const key = await askForKey(message);
  asking = false;
  declined = !key;
  if (key) setApiKey(key);
}

async function refresh() {
  const ready = await getJSON("/ready").catch(() => ({ status: 0, body: null }));
  showReady(ready.body, ready.status);
  const tasks = await getJSON("/tasks").catch(() => ({ status: 0, body: null }));
  $("tasks-error").textContent = "";
  if (tasks.status === 200) showTasks(tasks.body);
  else if (tasks.status === 401) {
    const error = tasks.body?.errors?.[0];
    $("tasks-error").textContent = `${error?.message || "An API key is needed."} (${error?.code || 401})`;
    needKey(`The task list needs an API key: ${error?.message || ""}`);
  } else $("tasks-error").textContent = "The task list is unavailable.";
}

$("change-key").addEventListener("click", () => needKey("Enter the API key to use with this server.", true));

async function loop() {
  await refresh();
  setTimeout(loop, REFRESH_MS); // after each refresh ends: slow answers never pile up
}
loop();
