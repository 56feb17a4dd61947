// Shared by the playground and the queue page: the API key (session storage only), keyed GETs, small DOM help.

const KEY = "k5serve.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

// A GET on this server with the key as a Bearer header (never in the URL). -> {status, body}
export async function getJSON(path) {
  const headers = apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {};
  const response = await fetch(path, { headers, cache: "no-store" });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  return { status: response.status, body };
}

// A version-4 UUID; crypto.randomUUID exists only on https or localhost, getRandomValues everywhere.
export function uuid4() {
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

// el("div", {class: "x", onclick: f}, child, "text") -> an element.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

// Ask for a key in the page's key dialog; resolves with the key entered, or null when cancelled. Cancel is a
// plain button (not a submit button), so Enter in the field submits with Connect, the only submit button.
export function askForKey(message) {
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-message").textContent = message;
  dialog.querySelector(".key-cancel").onclick = () => dialog.close("cancel");
  input.value = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok" ? input.value.trim() : null),
      { once: true });
    dialog.returnValue = ""; // Escape leaves it as it was: a cancel
    if (!dialog.open) dialog.showModal();
    input.focus();
  });
}

export function formatSeconds(s) {
  return s < 60 ? `${s.toFixed(1)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

// The CPU test mode notice, under the header, whenever /ready reports tiny weights: on every load (a dismissal
// lasts until the next one). #test-mode-time is the page's to update with a time it measured.
export function testModeNotice(ready) {
  const shown = document.getElementById("test-mode");
  if (!ready?.tiny_weights || shown) return shown;
  const code = (text) => el("code", { text });
  const notice = el("aside", { id: "test-mode", class: "notice", role: "note", "aria-label": "CPU test mode" },
    el("p", {},
      el("strong", { text: "CPU test mode: images are noise from tiny random weights." }),
      " Each image takes a few seconds here ",
      el("span", { id: "test-mode-time", text: "(about 2 s at 10 steps, 3 s at the default 20, 1024×1024, on 2 CPU cores)" }), "; ",
      code("steps: 10"), " is a quick smoke test. For real images, on a machine with an NVIDIA GPU: ",
      code("k5serve weights download"), " (about 60 GB, once), then ", code("k5serve serve"),
      " (in a checkout: ", code(".venv/bin/k5serve weights download"), ", then ", code("make serve"), ")."),
    el("button", { type: "button", class: "link", text: "dismiss", onclick: () => { notice.hidden = true; } }));
  document.getElementById("notices")?.append(notice);
  return notice;
}

// The key that goes with Enter for the keyboard shortcut: ⌘ on Apple systems, Ctrl elsewhere.
export function modifierName() {
  const platform = navigator.userAgentData?.platform || navigator.platform || "";
  return /mac|iphone|ipad/i.test(platform) ? "⌘" : "Ctrl";
}
