// The chat page of `dynllava serve`: no build step, nothing fetched but this server's own /v1 routes.
// It asks /v1/chat/completions with stream: true and "dynllava": {"explain": true}; the last chunk's
// choices[0].dynllava (dynllava/explain.py) says which image patches and generated tokens were kept.
"use strict";

const DIM_ALPHA = 0.7; // a dropped patch is drawn at 30% brightness, as dynllava/explain.py's DIM
const $ = (id) => document.getElementById(id);
const state = { imageUrl: null, image: null, history: [], abort: null, explain: null };

// ---------------------------------------------------------------- settings (kept in localStorage)
const SETTINGS = ["max-tokens", "temperature", "top-p", "top-k", "seed", "api-key"];

function loadSettings() {
  for (const id of SETTINGS) {
    const saved = localStorage.getItem("dynllava." + id);
    if (saved !== null) $(id).value = saved;
    $(id).addEventListener("change", () => localStorage.setItem("dynllava." + id, $(id).value));
  }
}

function number(id, integer) {
  const raw = $(id).value.trim();
  if (raw === "") return null;
  const value = Number(raw);
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new Error(`${$(id).parentElement.textContent.trim()} must be ${integer ? "an integer" : "a number"}`);
  }
  return value;
}

// ---------------------------------------------------------------- errors
function showError(text) {
  $("error").textContent = text;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function explainStatus(status, message) {
  if (status === 401) return `Bad or missing API key (the server was started with --api-key; enter it under Settings): ${message}`;
  if (status === 413) return `Image too large: ${message}`;
  if (status === 429) return `The server is overloaded; retry in a moment: ${message}`;
  if (status === 503) return `The server is not taking requests (shutting down?): ${message}`;
  if (status >= 500) return `Server error ${status}: ${message}`;
  return `Request refused (${status}): ${message}`;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error && body.error.message ? body.error.message : JSON.stringify(body);
  } catch (e) {
    return response.statusText || "no details";
  }
}

// ---------------------------------------------------------------- the image and its overlay
function setImage(file) {
  if (!file) return;
  clearError();
  const reader = new FileReader();
  reader.onload = () => {
    state.imageUrl = reader.result;
    state.explain = null;
    state.history = [];
    $("conversation").replaceChildren();
    $("image-stats").textContent = "";
    $("token-stats").textContent = "";
    const image = new Image();
    image.onload = () => { state.image = image; drawPreview(); };
    image.onerror = () => {
      state.image = null;
      drawPreview();
      $("image-stats").textContent = "The browser cannot show this image; it is sent to the server as it is.";
    };
    image.src = reader.result;
    $("drop-zone").classList.add("has-image");
    $("remove-image").hidden = false;
  };
  reader.onerror = () => showError(`Could not read ${file.name}: ${reader.error}`);
  reader.readAsDataURL(file);
}

function removeImage() {
  state.imageUrl = state.image = state.explain = null;
  state.history = [];
  $("conversation").replaceChildren();
  $("file").value = "";
  $("drop-zone").classList.remove("has-image");
  $("remove-image").hidden = true;
  $("image-stats").textContent = "";
  const canvas = $("overlay");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

function drawPreview() {
  // before an answer: the whole image, fitted into the square
  const canvas = $("overlay"), ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const image = state.image;
  if (!image) return;
  const scale = Math.min(canvas.width / image.naturalWidth, canvas.height / image.naturalHeight);
  const w = image.naturalWidth * scale, h = image.naturalHeight * scale;
  ctx.drawImage(image, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
}

function drawOverlay(explain) {
  // the square the model saw (explain.view: its box in the image's pixels, padding filled) with the dropped
  // patches dimmed; returns the number of patches left undimmed
  const canvas = $("overlay"), ctx = canvas.getContext("2d");
  const view = explain.view, [rows, cols] = explain.image_grid;
  const W = canvas.width, H = canvas.height;
  ctx.imageSmoothingEnabled = true;
  ctx.fillStyle = `rgb(${view.fill.join(",")})`;
  ctx.fillRect(0, 0, W, H);
  if (state.image) {
    const sx = W / view.width, sy = H / view.height;
    ctx.drawImage(state.image, -view.left * sx, -view.top * sy, state.image.naturalWidth * sx,
                  state.image.naturalHeight * sy);
  }
  const kept = new Set(explain.image_kept);
  ctx.fillStyle = `rgba(0, 0, 0, ${DIM_ALPHA})`;
  let shown = 0;
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const x0 = Math.round(c * W / cols), x1 = Math.round((c + 1) * W / cols);
      const y0 = Math.round(r * H / rows), y1 = Math.round((r + 1) * H / rows);
      if (kept.has(r * cols + c)) shown++;
      else ctx.fillRect(x0, y0, x1 - x0, y1 - y0);
    }
  }
  canvas.dataset.keptCells = String(shown);
  return shown;
}

// ---------------------------------------------------------------- the conversation
function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("conversation").appendChild(div);
  return div;
}

function renderTokens(div, explain) {
  const spans = explain.tokens.map((text, i) => {
    const span = document.createElement("span");
    const kept = explain.token_kept[i];
    span.className = kept === true ? "kept" : kept === false ? "dropped" : "undecided";
    span.title = kept === true ? "kept in the KV cache" : kept === false ? "dropped from the KV cache"
      : "never fed back through the model";
    span.textContent = text;
    return span;
  });
  div.replaceChildren(...spans);
}

function formatBytes(n) {
  if (n === null || n === undefined) return "?";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i ? `${n.toFixed(1)} ${units[i]}` : `${n} B`;
}

function showExplain(div, explain) {
  state.explain = explain;
  renderTokens(div, explain);
  const decided = explain.token_kept.filter((k) => k !== null);
  const keptTokens = decided.filter((k) => k).length;
  let text = `generated tokens kept in KV ${keptTokens}/${decided.length}`;
  if (explain.kv_bytes !== null) {
    text += ` · KV ${formatBytes(explain.kv_bytes)} held vs ${formatBytes(explain.kv_bytes_dense)} dense`;
  }
  $("token-stats").textContent = text;
  if (explain.image_grid && explain.view) {
    drawOverlay(explain);
    const [rows, cols] = explain.image_grid;
    $("image-stats").textContent = `image tokens kept ${explain.image_kept.length}/${explain.image_tokens} ` +
      `(${rows}x${cols} patches; dimmed ones were dropped)`;
  }
}

async function* sseEvents(response) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function requestBody(question) {
  const messages = state.history.concat([{ role: "user", content: question }]);
  if (state.imageUrl) { // LLaVA-1.5: the image goes with the first user message
    const first = messages[0];
    messages[0] = { role: "user", content: [{ type: "text", text: first.content },
                                             { type: "image_url", image_url: { url: state.imageUrl } }] };
  }
  const body = { messages, stream: true, dynllava: { explain: true } };
  const fields = [["max_tokens", "max-tokens", true], ["temperature", "temperature", false],
                  ["top_p", "top-p", false], ["top_k", "top-k", true], ["seed", "seed", true]];
  for (const [name, id, integer] of fields) {
    const value = number(id, integer);
    if (value !== null) body[name] = value;
  }
  return body;
}

async function ask(event) {
  event.preventDefault();
  const question = $("prompt").value.trim();
  if (!question || state.abort) return;
  clearError();
  let body;
  try {
    body = requestBody(question);
  } catch (e) {
    showError(e.message);
    return;
  }
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = "Bearer " + key;
  const controller = new AbortController();
  state.abort = controller;
  $("send").disabled = true;
  $("stop").disabled = false;
  const asked = addMessage("user", question);
  const answer = addMessage("assistant", "");
  answer.classList.add("streaming");
  let text = "";
  try {
    const response = await fetch("v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body),
                                                          signal: controller.signal });
    if (!response.ok) {
      if (response.status === 401) { // show where the key goes
        $("settings").open = true;
        $("api-key").focus();
      }
      throw new Error(explainStatus(response.status, await errorMessage(response)));
    }
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(explainStatus(chunk.error.code || 500, chunk.error.message));
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) {
          text += choice.delta.content;
          answer.textContent = text;
        }
        if (choice.dynllava) showExplain(answer, choice.dynllava);
      }
    }
    state.history.push({ role: "user", content: question }, { role: "assistant", content: text });
    $("prompt").value = "";
  } catch (e) {
    if (e.name === "AbortError") {
      answer.textContent = text + " [stopped]";
    } else {
      showError(e instanceof TypeError ? `Could not reach the server: ${e.message}` : e.message);
      asked.remove();
      answer.remove();
    }
  } finally {
    answer.classList.remove("streaming");
    answer.classList.add("done");
    state.abort = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

// ---------------------------------------------------------------- wiring
function init() {
  loadSettings();
  $("file").addEventListener("change", () => setImage($("file").files[0]));
  $("remove-image").addEventListener("click", removeImage);
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    if (!e.dataTransfer.files.length) return;
    try { $("file").files = e.dataTransfer.files; } catch (err) { $("file").value = ""; } // the input names it
    setImage(e.dataTransfer.files[0]);
  });
  $("ask").addEventListener("submit", ask);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => state.abort && state.abort.abort());
  $("new-chat").addEventListener("click", () => {
    state.history = [];
    $("conversation").replaceChildren();
    $("token-stats").textContent = "";
    clearError();
  });
  document.body.dataset.ready = "1";
}

init();
