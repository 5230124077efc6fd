// The try-it page: pick or drop images, see their classes, compare them by embedding, read the model card.
// Plain modules, no framework, nothing from another origin (the Content-Security-Policy allows only 'self').

const $ = (id) => document.getElementById(id);

// Page state. The API key lives here and nowhere else: never in localStorage, sessionStorage or a cookie.
const state = {
  apiKey: "",
  files: [],
  previews: [],
  busy: false,
  runs: 0, // finished runs, on <body data-runs>: tests and scripts wait on it
};

// ---- the API -------------------------------------------------------------------------------------------

// Every call goes through here: one place for the key, the query and (later) the model a request is for.
// A model picker would add its choice to `params` in `apiParams()`; nothing else needs to change.
function apiParams(extra = {}) {
  return { ...extra };
}

class ApiError extends Error {
  constructor(status, code, message, requestId, retryAfter) {
    super(message);
    Object.assign(this, { status, code, requestId, retryAfter });
  }
}

async function api(path, { method = "GET", params = {}, body } = {}) {
  const query = new URLSearchParams(apiParams(params)).toString();
  // Relative URLs: the page works behind a proxy that serves it under a path prefix.
  const url = query ? `${path}?${query}` : path;
  const headers = { Accept: "application/json" };
  if (state.apiKey) headers.Authorization = `Bearer ${state.apiKey}`;
  const started = performance.now();
  let response;
  try {
    response = await fetch(url, { method, headers, body, cache: "no-store" });
  } catch (err) {
    throw new ApiError(0, "network_error", `the server could not be reached (${err.message})`);
  }
  const roundTripMs = performance.now() - started;
  const requestId = response.headers.get("x-request-id");
  let data = null;
  try {
    data = await response.json();
  } catch {
    // not JSON: a proxy's error page, say; the status line is all there is to show
  }
  if (!response.ok) {
    const error = data && data.error;
    throw new ApiError(
      response.status,
      error ? error.code : "http_error",
      error ? error.message : `${response.status} ${response.statusText}`.trim(),
      (data && data.request_id) || requestId,
      response.headers.get("retry-after"),
    );
  }
  return { data, requestId, roundTripMs, headers: response.headers };
}

function formData(files) {
  const form = new FormData();
  for (const file of files) form.append("images", file, file.name);
  return form;
}

// ---- rendering helpers ---------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

const ms = (value) => (value === null || value === undefined ? "–" : `${Number(value).toFixed(2)} ms`);
const percent = (score) => `${(score * 100).toFixed(2)}%`;

// The server's own figures (X-Preprocess-Time-Ms, X-Queue-Time-Ms, X-Inference-Time-Ms) and the round trip
// this page measured; each also as data-value, in milliseconds.
function renderTimings(target, result, count) {
  const h = result.headers;
  const items = [
    ["images", `${count} image${count === 1 ? "" : "s"}`, String(count)],
    ["preprocess", "preprocess", h.get("x-preprocess-time-ms")],
    ["queue", "queue", h.get("x-queue-time-ms")],
    ["inference", "inference", h.get("x-inference-time-ms")],
    ["round-trip", "round trip", result.roundTripMs.toFixed(2)],
  ];
  target.replaceChildren(
    ...items.map(([name, text, value]) =>
      el("span", { class: "timing", "data-timing": name, "data-value": value, text: name === "images" ? text : `${text} ${ms(value)}` }),
    ),
  );
  if (result.requestId) {
    target.append(el("span", { class: "timing" }, "request ", el("code", { text: result.requestId })));
  }
}

function showError(err) {
  const box = $("error");
  box.replaceChildren();
  const title = err.status ? `${err.status} ${err.code}` : err.code;
  box.append(el("strong", { text: title }), " ", el("span", { class: "error-message", text: err.message }));
  if (err.retryAfter) box.append(el("span", { class: "retry", text: `Retry after ${err.retryAfter} s.` }));
  if (err.status === 401) box.append(el("span", { text: "Type the server's API key above." }));
  if (err.requestId) box.append(el("span", { class: "request-id" }, "request ", el("code", { text: err.requestId })));
  box.dataset.status = String(err.status);
  box.dataset.code = err.code;
  box.hidden = false;
}

function clearError() {
  const box = $("error");
  box.hidden = true;
  box.replaceChildren();
  delete box.dataset.status;
  delete box.dataset.code;
}

function setStatus(text) {
  $("status").textContent = text;
}

// ---- the model card ------------------------------------------------------------------------------------

function setField(name, value) {
  const dd = document.querySelector(`#model-card [data-field="${name}"]`);
  if (typeof value === "string") dd.textContent = value;
  else dd.replaceChildren(value);
}

async function loadModel() {
  const note = $("model-status");
  try {
    const { data } = await api("model");
    setField("variant", data.variant);
    setField("classes", String(data.num_classes));
    setField("precision", data.precision);
    setField("providers", data.providers.join(", "));
    setField("input", `${data.input_size}×${data.input_size}, embedding ${data.embedding_dim}`);
    const weights = data.weights || {};
    const digest = weights.sha256 || "?";
    const from = weights.source && weights.source !== digest ? ` from ${weights.source}` : "";
    const seed = weights.seed !== undefined ? ` (seed ${weights.seed})` : "";
    setField("weights", el("span", {}, el("code", { text: digest.slice(0, 16), title: digest }), from + seed));
    note.textContent = "";
    const warning = $("warning");
    if (data.warning) {
      warning.replaceChildren(el("strong", { text: "Not a trained model. " }), data.warning);
      warning.hidden = false;
    } else {
      warning.hidden = true;
    }
  } catch (err) {
    if (err.status === 401) note.textContent = "The server needs an API key to show its model: type it above.";
    else if (err.status === 503) {
      note.textContent = `${err.message}; trying again shortly.`;
      setTimeout(loadModel, 1000 * (Number(err.retryAfter) || 2));
    } else note.textContent = `The model card could not be loaded: ${err.message}`;
  }
}

// ---- classification ------------------------------------------------------------------------------------

function setFiles(files) {
  for (const url of state.previews) URL.revokeObjectURL(url);
  state.files = Array.from(files);
  state.previews = state.files.map((file) => URL.createObjectURL(file));
  $("run").disabled = state.files.length === 0;
}

function renderPredictions(results) {
  const list = $("results");
  list.replaceChildren();
  results.forEach((result, i) => {
    const predictions = el("ol", { class: "predictions", "aria-label": `classes of ${result.filename}` });
    for (const p of result.predictions) {
      const bar = el("span", { class: "bar", "aria-hidden": "true" });
      bar.style.setProperty("--score", String(Math.max(0, Math.min(1, p.score))));
      predictions.append(
        el(
          "li",
          { class: "prediction", "data-label": p.label, "data-score": String(p.score), "data-index": String(p.index) },
          el("span", { class: "label", text: p.label }),
          el("span", { class: "track", "aria-hidden": "true" }, bar),
          el("span", { class: "score", text: percent(p.score), title: String(p.score) }),
        ),
      );
    }
    const figure = el(
      "figure",
      { class: "image" },
      el("img", { src: state.previews[i], alt: result.filename || `image ${i + 1}` }),
      el("figcaption", { text: result.filename || `image ${i + 1}` }),
    );
    list.append(el("li", { class: "result", "data-filename": result.filename }, figure, predictions));
  });
  $("results-section").hidden = false;
}

function cosine(a, b) {
  let dot = 0;
  let na = 0;
  let nb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return dot / (Math.sqrt(na) * Math.sqrt(nb) || 1);
}

function renderSimilarity(results) {
  const table = $("similarity");
  const names = results.map((r, i) => r.filename || `image ${i + 1}`);
  const head = el("tr", {}, el("td"), ...names.map((name) => el("th", { scope: "col", text: name })));
  const rows = results.map((a, i) => {
    const cells = results.map((b, j) => {
      const value = cosine(a.embedding, b.embedding);
      const cell = el("td", { "data-i": String(i), "data-j": String(j), "data-value": String(value) });
      cell.textContent = value.toFixed(3);
      cell.style.setProperty("--similarity", String(Math.max(0, value)));
      return cell;
    });
    return el("tr", {}, el("th", { scope: "row", text: names[i] }), ...cells);
  });
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
  $("similarity-section").hidden = false;
}

async function run() {
  if (state.busy || state.files.length === 0) return;
  state.busy = true;
  document.body.dataset.state = "busy";
  $("run").disabled = true;
  clearError();
  const files = state.files;
  const count = files.length;
  setStatus(`Classifying ${count} image${count === 1 ? "" : "s"}…`);
  $("similarity-section").hidden = true;
  try {
    const topK = $("top-k").value.trim();
    const classified = await api("classify", {
      method: "POST",
      params: topK ? { top_k: topK } : {},
      body: formData(files),
    });
    renderPredictions(classified.data.results);
    renderTimings($("timings"), classified, count);
    setStatus(`Classified ${count} image${count === 1 ? "" : "s"}.`);
    if (count > 1) {
      setStatus(`Classified ${count} images; comparing their embeddings…`);
      const embedded = await api("embed", { method: "POST", params: { normalize: "true" }, body: formData(files) });
      renderSimilarity(embedded.data.results);
      renderTimings($("embed-timings"), embedded, count);
      setStatus(`Classified and compared ${count} images.`);
    }
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    showError(err);
    setStatus("");
  } finally {
    state.busy = false;
    $("run").disabled = state.files.length === 0;
    state.runs += 1;
    document.body.dataset.runs = String(state.runs);
    document.body.dataset.state = "idle";
  }
}

// ---- wiring --------------------------------------------------------------------------------------------

function start() {
  const form = $("images-form");
  const input = $("files");
  const zone = $("drop-zone");

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
  input.addEventListener("change", () => {
    setFiles(input.files);
    run();
  });
  const key = $("api-key");
  key.addEventListener("input", () => {
    state.apiKey = key.value.trim();
  });
  key.addEventListener("change", () => {
    state.apiKey = key.value.trim();
    loadModel();
  });

  // Dropping files works anywhere on the zone; the input inside it stays the keyboard's way in.
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    const files = Array.from(event.dataTransfer.files);
    if (files.length === 0) return;
    setFiles(files);
    run();
  });

  document.body.dataset.state = "idle";
  document.body.dataset.runs = "0";
  loadModel();
}

start();
