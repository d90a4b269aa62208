// The swarm monitor: polls /api/swarm and redraws; the chat box streams from /v1.
// Plain browser JavaScript, no dependencies, nothing fetched from elsewhere.
"use strict";

const REFRESH_MS = 2000;
let modelId = null;
const history = [];

function el(tag, attrs, children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children || []) node.appendChild(child);
  return node;
}

function fmt(value, digits, unit) {
  if (value === null || value === undefined) return "–";
  return Number(value).toFixed(digits) + (unit || "");
}

function spanBar(span, blocks) {
  const bar = el("div", {class: "span-bar", title: "blocks " + span[0] + "–" + (span[1] - 1)});
  const fill = el("div");
  fill.style.left = (100 * span[0] / blocks) + "%";
  fill.style.width = (100 * (span[1] - span[0]) / blocks) + "%";
  bar.appendChild(fill);
  return bar;
}

function coverageBar(model) {
  const bar = el("div", {class: "coverage", "data-model": model.id});
  model.coverage.forEach((count, block) => {
    const cell = el("div", {class: "block c" + Math.min(count, 3),
                            title: "block " + block + ": " + count + " serving worker(s)",
                            text: String(count)});
    cell.dataset.block = block;
    bar.appendChild(cell);
  });
  return bar;
}

function gapsLine(model) {
  if (!model.gaps.length) {
    return el("div", {class: "gaps", text: "every block is served"});
  }
  const runs = model.gaps.map(g => g[1] - g[0] === 1 ? "" + g[0] : g[0] + "–" + (g[1] - 1));
  return el("div", {class: "gaps bad", text: "gaps: blocks " + runs.join(", ")});
}

function workerRow(worker, blocks) {
  const cells = [
    el("td", {class: "id", title: worker.id, text: worker.id.slice(0, 12)}),
    el("td", {text: worker.address.split("#")[0]}),
    el("td", {}, [spanBar(worker.span, blocks)]),
    el("td", {text: worker.span[0] + ":" + worker.span[1]}),
    el("td", {class: "state " + worker.state, text: worker.state}),
    el("td", {class: "num", text: fmt(worker.throughput, 1)}),
    el("td", {class: "num", text: worker.cache_tokens === null ? "–" : String(worker.cache_tokens)}),
    el("td", {class: "num sessions", text: worker.sessions === null ? "–" : String(worker.sessions)}),
    el("td", {text: worker.reachable ? "yes" : "no"}),
    el("td", {class: "num", text: fmt(worker.rtt_ms, 1, " ms")}),
    el("td", {class: "num", text: worker.last_seen_ago_s === null ? "never" :
                                  fmt(worker.last_seen_ago_s, 0, " s ago")}),
  ];
  const row = el("tr", {class: "worker"}, cells);
  row.dataset.id = worker.id;
  row.dataset.state = worker.state;
  return row;
}

function modelCard(model) {
  const heads = ["worker", "address", "blocks", "span", "state", "tokens/s", "free cache tokens",
                 "sessions", "reachable", "RTT", "last seen"];
  const table = el("table", {class: "workers"}, [
    el("thead", {}, [el("tr", {}, heads.map(h => el("th", {text: h})))]),
    el("tbody", {}, model.workers.map(w => workerRow(w, model.num_blocks))),
  ]);
  const serving = model.workers.filter(w => w.serving).length;
  return el("div", {class: "model", "data-model": model.id}, [
    el("h2", {text: model.id + " — " + model.num_blocks + " blocks, " + serving + " of " +
                    model.workers.length + " workers serving"}),
    coverageBar(model),
    gapsLine(model),
    table,
  ]);
}

// the key typed in the chat box's key field, for servers run with --api-key
function keyHeaders() {
  const key = document.getElementById("chat-key").value;
  return key ? {authorization: "Bearer " + key} : {};
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const response = await fetch("/api/swarm", {cache: "no-store", headers: keyHeaders()});
    if (response.status === 401) {
      status.textContent = "this server needs its API key: type it in the key box below";
      return;
    }
    const swarm = await response.json();
    const models = document.getElementById("models");
    models.replaceChildren(...swarm.models.map(modelCard));
    if (swarm.models.length) modelId = swarm.models[0].id;
    const ago = swarm.polled_ago_s === null ? "not polled yet" :
                "swarm polled " + fmt(swarm.polled_ago_s, 0) + " s ago";
    status.textContent = ago + " · updated " + new Date().toLocaleTimeString();
  } catch (err) {
    status.textContent = "cannot reach the server: " + err;
  }
}

// --- chat ---------------------------------------------------------------------------

function addMessage(role, text) {
  const node = el("div", {class: "msg " + role, text: text});
  const log = document.getElementById("chat-log");
  log.appendChild(node);
  log.scrollTop = log.scrollHeight;
  return node;
}

async function readEvents(response, onData) {
  // server-sent events: "data: ..." lines, events separated by a blank line
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) {
          const data = line.slice(6);
          if (data === "[DONE]") return;
          onData(JSON.parse(data));
        }
      }
    }
  }
}

async function send(event) {
  event.preventDefault();
  const input = document.getElementById("chat-input");
  const text = input.value.trim();
  if (!text || !modelId) return;
  input.value = "";
  addMessage("user", text);
  history.push({role: "user", content: text});
  const answer = addMessage("assistant", "");
  const headers = {"content-type": "application/json", ...keyHeaders()};
  const button = document.getElementById("chat-send");
  button.disabled = true;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers,
      body: JSON.stringify({model: modelId, messages: history, stream: true, max_tokens: 128}),
    });
    if (!response.ok) {
      const body = await response.json();
      throw new Error(body.error ? body.error.message : response.statusText);
    }
    let pieces = 0;
    await readEvents(response, chunk => {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) {
          answer.textContent += choice.delta.content;
          pieces += 1;
        }
        if (choice.finish_reason) answer.dataset.finish = choice.finish_reason;
      }
    });
    // how many content pieces streamed in; an answer that is empty or only whitespace (the
    // model stopped at once) is marked so the reader sees that it ended
    answer.dataset.pieces = String(pieces);
    if (!answer.textContent.trim()) answer.classList.add("empty");
    answer.dataset.done = "true";
    history.push({role: "assistant", content: answer.textContent});
  } catch (err) {
    answer.classList.add("error");
    answer.textContent = String(err.message || err);
    answer.dataset.done = "true";
    history.pop();
  } finally {
    button.disabled = false;
  }
}

document.getElementById("chat-form").addEventListener("submit", send);
refresh();
setInterval(refresh, REFRESH_MS);
