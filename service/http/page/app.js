// The try-it page: pick or drop images, see their classes, compare them by embedding, read the model card.
// Plain modules, no framework, nothing from another origin (the Content-Security-Policy allows only 'self').

const $ = (id) => document.getElementById(id);

// Page state. The API key lives here and nowhere else: never in localStorage, sessionStorage or a cookie.
const state = {
  apiKey: "",
  files: [],
  previews: [],
  heatmaps: [], // object URLs of the heatmap overlays shown, revoked with the previews
  busy: false,
  again: false, // a run was asked for while one was in flight: run once more when it ends
  runs: 0, // finished runs, on <body data-runs>: tests and scripts wait on it
  // Which model requests are for: "" leaves it to the server (its only or default model, the latest version).
  model: "",
  version: "",
  card: null, // the model card of the current choice, once loaded
  cardLoads: 0, // model cards asked for: only the latest one's answer is shown
};

// ---- the API -------------------------------------------------------------------------------------------

// Every call goes through here: one place for the key, the query and the model a request is for.
// The model picker's choice goes into every request's query; `scoped: false` leaves it out (the model index).
function apiParams(extra = {}, scoped = true) {
  const chosen = {};
  if (scoped && state.model) {
    chosen.model = state.model;
    if (state.version) chosen.version = state.version;
  }
  return { ...chosen, ...extra };
}

class ApiError extends Error {
  constructor(status, code, message, requestId, retryAfter) {
    super(message);
    Object.assign(this, { status, code, requestId, retryAfter });
  }
}

// `image: true` asks for a picture (the answer's data is then a Blob); errors are JSON either way.
async function api(path, { method = "GET", params = {}, body, json, scoped = true, image = false } = {}) {
  const query = new URLSearchParams(apiParams(params, scoped)).toString();
  // Relative URLs: the page works behind a proxy that serves it under a path prefix.
  const url = query ? `${path}?${query}` : path;
  const headers = { Accept: image ? "image/png, application/json" : "application/json" };
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
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
  if (image && response.ok) {
    return { data: await response.blob(), requestId, roundTripMs, headers: response.headers };
  }
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

const LABEL_SOURCES = {
  imagenet: "ImageNet's (bundled)",
  file: "from a labels file",
  generic: "generic: nobody named the classes",
  none: "none (headless)",
};

// The models the server serves, from the Open Inference Protocol's index (READY versions only). It sits behind
// the API key like every other call; it is asked only when the server needs a model named and none is.
async function servedModels() {
  const { data } = await api("v2/repository/index", { method: "POST", json: { ready: true }, scoped: false });
  const ready = (Array.isArray(data) ? data : []).filter((row) => row.state === "READY" && row.name);
  return [...new Set(ready.map((row) => row.name))].sort();
}

// GET /model for the current choice. A server that serves several models and was told none answers 422: then
// the index says which there are and the first is chosen. A chosen model or version that has gone since
// (404) falls back to the server's default once.
async function fetchCard() {
  try {
    return (await api("model")).data;
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    if (err.status === 422 && err.code === "invalid_parameter" && !state.model) {
      const names = await servedModels();
      if (names.length === 0) throw err;
      state.model = names[0];
      state.version = "";
      return (await api("model")).data;
    }
    if (err.status === 404 && err.code === "model_not_found" && state.model) {
      state.model = "";
      state.version = "";
      return fetchCard();
    }
    throw err;
  }
}

function renderCard(data) {
  const headless = data.top_k === null || data.top_k === undefined;
  const card = $("model-card");
  card.dataset.model = data.name;
  card.dataset.version = String(data.version);
  card.dataset.headless = String(headless);
  setField("name", `${data.name}, version ${data.version}`);
  setField("variant", data.variant);
  setField("classes", headless ? "none: a headless backbone (embeddings only)" : String(data.num_classes));
  setField("labels", LABEL_SOURCES[data.labels_source] || data.labels_source || "–");
  setField("precision", data.precision);
  setField("providers", data.providers.join(", "));
  setField("input", `${data.input_size}×${data.input_size}, embedding ${data.embedding_dim}`);
  const weights = data.weights || {};
  const digest = weights.sha256 || "?";
  const from = weights.source && weights.source !== digest ? ` from ${weights.source}` : "";
  const seed = weights.seed !== undefined ? ` (seed ${weights.seed})` : "";
  setField("weights", el("span", {}, el("code", { text: digest.slice(0, 16), title: digest }), from + seed));
  const warning = $("warning");
  if (data.warning) {
    warning.replaceChildren(el("strong", { text: "Not a trained model. " }), data.warning);
    warning.hidden = false;
  } else {
    warning.hidden = true;
  }
  renderTopK(data.top_k);
}

// "Classes per image" follows the model: its limit is the card's top_k.max; a headless model has no classes.
function renderTopK(limits) {
  const input = $("top-k");
  const hint = $("top-k-hint");
  if (!limits) {
    input.disabled = true;
    input.removeAttribute("max");
    hint.textContent = "(none: this model has no classifier)";
    $("run").textContent = "Embed again";
    return;
  }
  input.disabled = false;
  input.max = String(limits.max);
  const asked = Number(input.value);
  if (input.value.trim() && Number.isFinite(asked) && asked > limits.max) input.value = String(limits.max);
  hint.textContent = `(1 to ${limits.max})`;
  $("run").textContent = "Classify again";
}

// Replace a <select>'s options only when they changed: rebuilding them under a keyboard user's focus would
// be a needless jolt for a screen reader.
function setOptions(select, options, selected) {
  const same =
    select.options.length === options.length &&
    options.every(([value, text], i) => select.options[i].value === value && select.options[i].text === text);
  if (!same) select.replaceChildren(...options.map(([value, text]) => el("option", { value, text })));
  select.value = selected;
}

// The pickers show only where there is a choice: several models, or several versions of the chosen one.
function renderPicker(data) {
  const models = Array.isArray(data.models) && data.models.length ? data.models : [data.name];
  const versions = Array.isArray(data.versions) && data.versions.length ? data.versions : [data.version];
  const latest = Math.max(...versions);
  setOptions($("model-select"), models.map((name) => [name, name]), data.name);
  setOptions(
    $("version-select"),
    versions.map((v) => [String(v), v === latest ? `${v} (latest)` : String(v)]),
    String(data.version),
  );
  $("model-field").hidden = models.length < 2;
  $("version-field").hidden = versions.length < 2;
  $("model-picker").hidden = models.length < 2 && versions.length < 2;
}

// Load the model card of the current choice; true once it is shown (false: failed, or a later choice won).
async function loadModel() {
  const ticket = ++state.cardLoads;
  const note = $("model-status");
  try {
    const data = await fetchCard();
    if (ticket !== state.cardLoads) return false;
    state.card = data;
    renderCard(data);
    renderPicker(data);
    note.textContent = "";
    return true;
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    if (ticket !== state.cardLoads) return false;
    if (err.status === 401) note.textContent = "The server needs an API key to show its model: type it above.";
    else if (err.status === 503) {
      note.textContent = `${err.message}; trying again shortly.`;
      setTimeout(loadModel, 1000 * (Number(err.retryAfter) || 2));
    } else note.textContent = `The model card could not be loaded: ${err.message}`;
    return false;
  }
}

// A new choice: its model card, then the current images again, against it.
async function choose(model, version) {
  state.model = model;
  state.version = version;
  $("model-status").textContent = `Loading the model card of ${model}${version ? `, version ${version}` : ""}…`;
  if ((await loadModel()) && state.files.length > 0) run();
}

// ---- classification ------------------------------------------------------------------------------------

function setFiles(files) {
  for (const url of [...state.previews, ...state.heatmaps]) URL.revokeObjectURL(url);
  state.heatmaps = [];
  state.files = Array.from(files);
  state.previews = state.files.map((file) => URL.createObjectURL(file));
  $("run").disabled = state.files.length === 0;
}

function figure(result, i) {
  return el(
    "figure",
    { class: "image" },
    el("img", { src: state.previews[i], alt: result.filename || `image ${i + 1}` }),
    el("figcaption", { text: result.filename || `image ${i + 1}` }),
  );
}

// Which model answered (each response names it), above the results.
function showAnswerer(answer, headless) {
  const section = $("results-section");
  section.dataset.model = answer.model_name;
  section.dataset.version = String(answer.model_version);
  section.dataset.headless = String(headless);
  $("results-heading").textContent = headless ? "Embeddings" : "Classes";
  const { model_name: name, model_version: version, model: variant } = answer;
  $("results-model").textContent = `From model ${name}, version ${version} (${variant}).`;
  $("headless-note").hidden = !headless;
}

// Where the model found a class: /explain's heatmap over the image, for the model that answered. One class
// per image at a time; pressing the shown class again brings the plain image back.
async function toggleHeatmap(answer, i, p, button) {
  const card = button.closest(".result");
  const img = card.querySelector("figure img");
  const name = answer.results[i].filename || `image ${i + 1}`;
  const showing = button.getAttribute("aria-pressed") === "true";
  for (const other of card.querySelectorAll("button.explain")) other.setAttribute("aria-pressed", "false");
  if (showing) {
    img.src = state.previews[i];
    img.alt = name;
    delete img.dataset.heatmap;
    return;
  }
  clearError();
  button.disabled = true;
  try {
    // The model that answered, where the page names models at all (one model served: the server's choice).
    const which = state.model ? { model: answer.model_name, version: String(answer.model_version) } : {};
    const params = { ...which, class: String(p.index), format: "png", max_side: "512" };
    const overlay = await api("explain", { method: "POST", params, scoped: false, image: true,
                                           body: formData([state.files[i]]) }); // prettier-ignore
    const url = URL.createObjectURL(overlay.data);
    state.heatmaps.push(url);
    img.src = url;
    img.alt = `${name}: where the model found ${p.label}`;
    img.dataset.heatmap = String(p.index);
    button.setAttribute("aria-pressed", "true");
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    showError(err);
  } finally {
    button.disabled = false;
  }
}

function renderPredictions(answer) {
  const list = $("results");
  list.replaceChildren();
  showAnswerer(answer, false);
  // Models exported before class activation maps cannot be explained: no heatmap toggles for them.
  const explainable = Boolean(state.card && state.card.explainable);
  answer.results.forEach((result, i) => {
    const predictions = el("ol", { class: "predictions", "aria-label": `classes of ${result.filename}` });
    for (const p of result.predictions) {
      const bar = el("span", { class: "bar", "aria-hidden": "true" });
      bar.style.setProperty("--score", String(Math.max(0, Math.min(1, p.score))));
      const toggle = explainable
        ? el("button", {
            type: "button",
            class: "explain",
            "aria-pressed": "false",
            "aria-label": `Show where the model found ${p.label} in ${result.filename || `image ${i + 1}`}`,
            title: `Heatmap: where the model found ${p.label}`,
            text: "Where?",
          })
        : "";
      if (toggle) toggle.addEventListener("click", () => toggleHeatmap(answer, i, p, toggle));
      predictions.append(
        el(
          "li",
          { class: "prediction", "data-label": p.label, "data-score": String(p.score), "data-index": String(p.index) },
          el("span", { class: "label", text: p.label }),
          el("span", { class: "track", "aria-hidden": "true" }, bar),
          el("span", { class: "score", text: percent(p.score), title: String(p.score) }),
          toggle,
        ),
      );
    }
    list.append(el("li", { class: "result", "data-filename": result.filename }, figure(result, i), predictions));
  });
  $("results-section").hidden = false;
}

// A headless model: the images with their embeddings' size, no class bars (there are no classes).
function renderEmbeddings(answer) {
  const list = $("results");
  list.replaceChildren();
  showAnswerer(answer, true);
  answer.results.forEach((result, i) => {
    const about = el("p", {
      class: "embedding-note",
      "data-dim": String(result.embedding.length),
      text: `No classes: an embedding of ${result.embedding.length} numbers.`,
    });
    list.append(el("li", { class: "result", "data-filename": result.filename }, figure(result, i), about));
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
  if (state.files.length === 0) return;
  if (state.busy) {
    state.again = true; // the images or the model changed mid-run: this run's answer is already stale
    return;
  }
  state.busy = true;
  document.body.dataset.state = "busy";
  $("run").disabled = true;
  clearError();
  const files = state.files;
  const count = files.length;
  const scope = apiParams(); // one model for the whole run, even if the picker changes meanwhile
  const plural = count === 1 ? "" : "s";
  $("similarity-section").hidden = true;
  try {
    // A headless model (no top_k in its card, or a 400 no_classifier) gets embeddings only: not an error.
    let headless = Boolean(state.card) && !state.card.top_k;
    if (!headless) {
      setStatus(`Classifying ${count} image${plural}…`);
      const topK = $("top-k").value.trim();
      try {
        const classified = await api("classify", {
          method: "POST",
          params: topK ? { ...scope, top_k: topK } : scope,
          body: formData(files),
        });
        renderPredictions(classified.data);
        renderTimings($("timings"), classified, count);
        setStatus(`Classified ${count} image${plural}.`);
      } catch (err) {
        if (!(err instanceof ApiError) || err.code !== "no_classifier") throw err;
        headless = true;
      }
    }
    if (headless || count > 1) {
      if (headless) setStatus(`Embedding ${count} image${plural}…`);
      else setStatus(`Classified ${count} images; comparing their embeddings…`);
      const params = { ...scope, normalize: "true" };
      const embedded = await api("embed", { method: "POST", params, body: formData(files) });
      if (headless) {
        renderEmbeddings(embedded.data);
        renderTimings($("timings"), embedded, count);
      }
      if (count > 1) {
        renderSimilarity(embedded.data.results);
        renderTimings($("embed-timings"), embedded, count);
      }
      if (headless) setStatus(count > 1 ? `Embedded and compared ${count} images.` : "Embedded 1 image.");
      else setStatus(`Classified and compared ${count} images.`);
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
    if (state.again) {
      state.again = false;
      run();
    }
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
  // A model names no version of its own: the latest is served unless one is picked.
  $("model-select").addEventListener("change", (event) => choose(event.target.value, ""));
  $("version-select").addEventListener("change", (event) => {
    const model = state.card ? state.card.name : state.model;
    if (model) choose(model, event.target.value);
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
