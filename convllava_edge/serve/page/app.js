// convllava-edge's page: a conversation about images (each dropped image joins it, going with the next question),
// answers streamed from /v1/chat/completions
// (the same OpenAI endpoint every client uses; no private API). Plain JavaScript, no build step, no downloads.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "convllava-edge-key"; // sessionStorage: this tab only

const state = {
  models: {},       // id -> /v1/models entry
  image: null,      // the last image chosen: {url: data URL, name, bytes, width, height, sent}
  images: [],       // the conversation's images, in the order chosen (sent: in a question already asked)
  messages: [],     // the conversation so far, OpenAI messages
  controller: null, // AbortController of the generation running
};

// -- the server ---------------------------------------------------------------------------------
function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function errorText(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    message = (body.error && (body.error.message || body.error)) || message;
  } catch (e) { /* not JSON: the status line says it */ }
  if (response.status === 503) {
    const after = response.headers.get("Retry-After");
    return `The server is busy: ${message}${after ? ` (retry in ${after} s)` : ""}`;
  }
  if (response.status === 401) {
    $("key-panel").hidden = false;
    return "This server needs an API key: enter it above.";
  }
  return message;
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    showError(await errorText(response));
    return;
  }
  const select = $("model");
  select.replaceChildren();
  for (const m of (await response.json()).data) {
    state.models[m.id] = m;
    select.append(new Option(m.id, m.id));
  }
  $("key-panel").hidden = true;
  describeModel();
}

function describeModel() {
  const m = state.models[$("model").value];
  $("model-info").textContent = m ? `${m.family}, ${m.llm_type}, vision ${m.vision.type} on ${m.vision.backend}, ` +
    `context ${m.context} positions` : "";
  if (state.image) describeImage();
}

// The image's positions in the prompt, from the rule /v1/models publishes (preprocess.native_size for native).
function imageTokens(rule, width, height) {
  if (rule.per_image) return rule.per_image;
  const stride = rule.stride, scale = Math.sqrt(rule.budget / (width * height));
  let w = Math.max(stride, Math.round(width * scale / stride) * stride);
  let h = Math.max(stride, Math.round(height * scale / stride) * stride);
  while (w * h > rule.budget) {
    if ((w > stride && w / (width * scale) >= h / (height * scale)) || h === stride) w -= stride;
    else h -= stride;
  }
  return (w / stride) * (h / stride);
}

// -- the image ----------------------------------------------------------------------------------
// Each image chosen joins the conversation in the order chosen (its data read in the background: a question
// waits for it) and goes with the next question.
function useFile(file) {
  if (!file) return;
  const img = { url: null, name: file.name || "pasted image", bytes: file.size, width: 0, height: 0, sent: false };
  state.images.push(img);
  addEntry("notice", state.images.length === 1 && state.messages.length === 0
    ? `New conversation about ${img.name}.`
    : `${img.name} added to this conversation: it goes with your next question.`);
  listImages();
  const reader = new FileReader();
  reader.onload = () => {
    img.url = reader.result;
    state.image = img;
    const thumb = $("thumb");
    thumb.onload = () => {
      img.width = thumb.naturalWidth;
      img.height = thumb.naturalHeight;
      if (state.image === img) describeImage();
    };
    thumb.onerror = () => { if (state.image === img) describeImage(); }; // the server decides whether it can read it
    thumb.src = reader.result;
    $("preview").hidden = false;
    describeImage();
  };
  reader.onerror = () => {
    state.images = state.images.filter((other) => other !== img);
    listImages();
    showError(`Could not read ${img.name}.`);
  };
  reader.readAsDataURL(file);
}

function describeImage() {
  const img = state.image, m = state.models[$("model").value];
  const size = `${(img.bytes / 1024).toFixed(1)} KiB`;
  if (!img.width) {
    $("thumb").alt = `${img.name}: no preview, the browser cannot show this file`;
    $("image-info").textContent = `${img.name}, ${size} (no preview)`;
    return;
  }
  $("thumb").alt = `The chosen image, ${img.name}`;
  const tokens = m ? `, ${imageTokens(m.image_tokens, img.width, img.height)} image tokens` : "";
  $("image-info").textContent = `${img.name}, ${img.width}×${img.height} px, ${size}${tokens}`;
}

// The conversation's images, each with whether it was asked about yet.
function listImages() {
  const list = $("images");
  list.replaceChildren();
  for (const img of state.images) {
    const li = document.createElement("li");
    li.textContent = `${img.name}${img.sent ? "" : " (goes with your next question)"}`;
    list.append(li);
  }
  $("images-title").hidden = list.hidden = state.images.length === 0;
}

// -- the conversation ---------------------------------------------------------------------------
function newConversation(notice) {
  state.messages = [];
  state.images = [];
  listImages();
  addEntry("notice", notice);
}

function addEntry(kind, text) {
  const li = document.createElement("li");
  li.className = kind;
  if (kind !== "notice") {
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = kind === "user" ? "You" : "Model";
    li.append(who);
  }
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.append(body);
  $("log").append(li);
  return li;
}

function showError(text) {
  $("error").textContent = text;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function ask(question) {
  const model = $("model").value;
  const pending = state.images.filter((img) => !img.sent); // this question's images, before its text
  const unread = pending.find((img) => !img.url);
  if (unread) { showError(`${unread.name} is still being read: ask again in a moment.`); return; }
  const content = pending.map((img) => ({ type: "image_url", image_url: { url: img.url } }));
  content.push({ type: "text", text: question });
  const messages = [...state.messages, { role: "user", content }];
  const body = { model, messages, stream: true, stream_options: { include_usage: true },
                 temperature: Number($("temperature").value || 0) };
  if ($("max-tokens").value) body.max_tokens = Number($("max-tokens").value);

  showError("");
  addEntry("user", question);
  const entry = addEntry("assistant", "");
  entry.setAttribute("aria-busy", "true");
  const text = entry.querySelector(".text");
  state.controller = new AbortController();
  setBusy(true);
  let answer = "", usage = null, timings = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const event of serverEvents(response)) {
      if (event.error) throw new Error(event.error.message || "the server stopped the answer");
      if (event.usage) { usage = event.usage; timings = event.timings; }
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta && delta.content) {
        answer += delta.content;
        text.textContent = answer;
      }
    }
    state.messages = [...messages, { role: "assistant", content: answer }];
    for (const img of pending) img.sent = true;
    listImages();
    if (usage) entry.append(timingView(usage, timings));
  } catch (e) {
    if (e.name === "AbortError") {
      entry.classList.add("stopped"); // not part of the conversation: the server kept no state for it
    } else {
      entry.remove();
      showError(e.message);
    }
  } finally {
    entry.removeAttribute("aria-busy");
    state.controller = null;
    setBusy(false);
  }
}

// Server-sent events: "data: {...}" lines, events separated by a blank line, "data: [DONE]" last.
async function* serverEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
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

// Where the time went: preprocess, encode, prefill, decode as a stacked bar, and the same in words.
function timingView(usage, t) {
  const decodeMs = t.decode_tokens_per_s > 0 ? usage.completion_tokens / t.decode_tokens_per_s * 1000 : 0;
  const parts = [["preprocess", t.preprocess_ms], ["encode", t.encode_ms], ["prefill", t.prefill_ms],
                 ["decode", decodeMs]];
  const total = parts.reduce((sum, [, ms]) => sum + ms, 0) || 1;
  const box = document.createElement("div");
  box.className = "timing";
  const bar = document.createElement("div");
  bar.className = "bar";
  bar.setAttribute("role", "img");
  bar.setAttribute("aria-label", parts.map(([name, ms]) => `${name} ${ms.toFixed(0)} ms`).join(", "));
  for (const [name, ms] of parts) {
    const span = document.createElement("span");
    span.className = name;
    span.style.width = `${(100 * ms / total).toFixed(2)}%`;
    bar.append(span);
  }
  const words = document.createElement("div");
  for (const [name, ms] of parts) { // each figure after a key of its colour in the bar
    const key = document.createElement("span");
    key.className = `key ${name}`;
    key.setAttribute("aria-hidden", "true");
    words.append(key, `${name} ${ms.toFixed(0)} ms · `);
  }
  words.append(`first token ${t.time_to_first_token_ms.toFixed(0)} ms · ${t.decode_tokens_per_s.toFixed(1)} tokens/s` +
    ` · ${usage.prompt_tokens} prompt positions (${usage.prompt_tokens_details.image_tokens} image)`);
  box.append(bar, words);
  const cached = usage.prompt_tokens_details.cached_tokens;
  if (cached > 0 || t.image_cache_hit) {
    const mark = document.createElement("span");
    mark.className = "cached";
    mark.textContent = "cached";
    mark.title = cached > 0 ? `${cached} prompt positions reused from the KV cache` : "image embeddings from the cache";
    words.append(mark);
  }
  return box;
}

// -- wiring -------------------------------------------------------------------------------------
$("file").addEventListener("change", (e) => { for (const f of e.target.files) useFile(f); e.target.value = ""; });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  for (const f of e.dataTransfer.files) useFile(f);
});
document.addEventListener("paste", (e) => {
  const file = [...(e.clipboardData ? e.clipboardData.files : [])].find((f) => f.type.startsWith("image/"));
  if (file) useFile(file);
});
$("ask-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const question = $("question").value.trim();
  if (!question) { showError("Type a question first."); return; }
  if (state.controller) return;
  $("question").value = "";
  ask(question);
});
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask-form").requestSubmit(); }
});
document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.controller) state.controller.abort(); });
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("new").addEventListener("click", () => newConversation("New conversation."));
$("model").addEventListener("change", () => { describeModel(); newConversation("New conversation (model changed)."); });
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY_STORE, $("key").value);
  $("key").value = "";
  showError("");
  loadModels();
});
loadModels();
