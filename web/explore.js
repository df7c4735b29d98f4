// The Explore tab: a dataset's embedding map (the server's 2-D PCA of a
// model's embeddings, drawn as points coloured by label or prediction; a
// click shows the image and its nearest neighbours), and the labelling view
// (a selection of images to label in a grid, a class given to each by click
// or key, saved through the labels API as a new label version).

import { createJob, datasetImage, datasetMap, followJob, putLabels, searchSimilar, selectImages } from "./api.js";
import { formatPercent, h, replaceChildren, shortId, toast } from "./dom.js";

/** Tableau's ten categorical colours; unlabelled points are grey. */
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
const NO_CLASS = "#c7cbd6";
const MAP_SIZE = { width: 640, height: 440, margin: 14 };
const NEIGHBOURS = 8;

let ctx;
let signature = "";
/** The map on show, with the class → colour it was drawn with. */
let current = null;
/** The labelling grid: the selected images, the class given to each, the focused cell. */
const grid = { selection: null, assigned: new Map(), classes: [], focus: 0 };
const thumbnails = new Map();

export function init(context) {
  ctx = context;
  document.getElementById("explore-dataset").addEventListener("change", () => {
    resetGrid();
    loadMap();
  });
  document.getElementById("explore-model").addEventListener("change", loadMap);
  document.getElementById("explore-colour").addEventListener("change", () => current?.map && drawMap(current.map));
  document.getElementById("explore-embed").addEventListener("click", computeEmbeddings);
  document.getElementById("selection-form").addEventListener("submit", chooseImages);
  document.getElementById("new-class-form").addEventListener("submit", addClass);
  document.getElementById("save-labels").addEventListener("click", saveLabels);
  document.getElementById("label-grid").addEventListener("keydown", gridKey);
}

/** Keeps the dataset and model choices in step with the lists. */
export function render() {
  const { datasets, models } = ctx.store;
  const next = JSON.stringify([datasets.map((d) => [d.id, d.name, d.label_version]), models.map((m) => m.id)]);
  if (next === signature) return;
  signature = next;
  const datasetSelect = document.getElementById("explore-dataset");
  const modelSelect = document.getElementById("explore-model");
  const [dataset, model] = [datasetSelect.value, modelSelect.value];
  replaceChildren(
    datasetSelect,
    datasets.map((d) => h("option", { value: d.id, text: `${d.name} · ${d.num_images} images` })),
  );
  replaceChildren(
    modelSelect,
    models.map((m) => h("option", { value: m.id, text: `${m.kind} ${shortId(m.id)} · ${m.pretext ?? m.backbone}` })),
  );
  if (datasets.some((d) => d.id === dataset)) datasetSelect.value = dataset;
  if (models.some((m) => m.id === model)) modelSelect.value = model;
  const empty = datasets.length === 0 || models.length === 0;
  document.getElementById("explore-empty").hidden = !empty;
  document.getElementById("explore-body").hidden = empty;
  if (!empty) show();
}

/** Draws the chosen map when the tab is on show and the map is missing or stale (labels saved elsewhere recolour it). */
export function show() {
  if (document.getElementById("view-explore").hidden) return;
  const { datasetId, modelId, dataset } = chosen();
  if (!datasetId || !modelId) return;
  if (!current || current.datasetId !== datasetId || current.modelId !== modelId || current.labelVersion !== dataset?.label_version) {
    loadMap();
  }
}

/** Opens the tab on a dataset (the Datasets tab's Explore button). */
export function open(datasetId) {
  const select = document.getElementById("explore-dataset");
  if ([...select.options].some((o) => o.value === datasetId)) {
    select.value = datasetId;
    resetGrid();
    loadMap();
  }
}

function chosen() {
  const datasetId = document.getElementById("explore-dataset").value;
  const modelId = document.getElementById("explore-model").value;
  return {
    datasetId,
    modelId,
    dataset: ctx.store.datasets.find((d) => d.id === datasetId),
    model: ctx.store.models.find((m) => m.id === modelId),
  };
}

function setStatus(text, kind = "") {
  const status = document.getElementById("explore-status");
  status.textContent = text;
  status.className = `status${kind ? ` status-${kind}` : ""}`;
}

let loading = 0;

async function loadMap() {
  const { datasetId, modelId, dataset } = chosen();
  if (!datasetId || !modelId) return;
  const ticket = ++loading;
  current = { datasetId, modelId, labelVersion: dataset?.label_version, map: null };
  const embed = document.getElementById("explore-embed");
  setStatus("Projecting the embeddings…");
  try {
    const map = await datasetMap(datasetId, modelId);
    if (ticket !== loading) return;
    embed.hidden = true;
    current.map = map;
    drawMap(map);
    const sampled = map.points.length < map.total ? `, an even sample of ${map.points.length}` : "";
    const [x, y] = map.explained_variance_ratio;
    setStatus(`${map.total} images${sampled}; the axes hold ${formatPercent(x)} and ${formatPercent(y)} of the variance.`);
  } catch (error) {
    if (ticket !== loading) return;
    replaceChildren(document.getElementById("map"));
    replaceChildren(document.getElementById("map-legend"));
    document.getElementById("map-detail").hidden = true;
    embed.hidden = error.status !== 409;
    setStatus(error.status === 409 ? "This model has not embedded this dataset yet: compute its embeddings to draw the map." : error.message, error.status === 409 ? "" : "error");
  }
}

async function computeEmbeddings() {
  const { datasetId, modelId } = chosen();
  const button = document.getElementById("explore-embed");
  button.disabled = true;
  try {
    const job = await createJob({ kind: "embed", dataset_id: datasetId, base_model_id: modelId });
    setStatus(`Embedding the images (job ${shortId(job.id)})…`);
    ctx.refresh();
    followJob(job.id, {
      onJob: (next) => {
        const { step, steps } = next.progress ?? {};
        if (steps) setStatus(`Embedding the images (job ${shortId(job.id)}): batch ${step} of ${steps}…`);
      },
      onMetrics: () => {},
      onEnd: (done) => {
        button.disabled = false;
        if (done.state === "succeeded") loadMap();
        else setStatus(`The embed job ${done.state}${done.error ? `: ${done.error}` : ""}.`, "error");
      },
    });
  } catch (error) {
    button.disabled = false;
    setStatus(`Could not start the embed job: ${error.message}`, "error");
  }
}

/** What a point is coloured by: its label, or the classifier's prediction. */
function colourKey(point) {
  return document.getElementById("explore-colour").value === "prediction" ? point.prediction ?? null : point.label;
}

function drawMap(map) {
  const { width, height, margin } = MAP_SIZE;
  const xs = map.points.map((p) => p.x);
  const ys = map.points.map((p) => p.y);
  const span = (values) => {
    const lo = Math.min(...values);
    const hi = Math.max(...values);
    return [lo, hi > lo ? hi - lo : 1];
  };
  const [x0, dx] = span(xs);
  const [y0, dy] = span(ys);
  const classes = [...new Set(map.points.map(colourKey).filter((c) => c !== null))].sort();
  const colour = (name) => (name === null ? NO_CLASS : PALETTE[classes.indexOf(name) % PALETTE.length]);
  const radius = map.points.length > 2000 ? 2 : map.points.length > 300 ? 3 : 5;
  // Unlabelled points first, so that the labelled ones are drawn on top.
  const ordered = [...map.points].sort((a, b) => (colourKey(a) === null ? 0 : 1) - (colourKey(b) === null ? 0 : 1));
  const circles = ordered.map((p) =>
    h(
      "svg:circle",
      {
        cx: (margin + ((p.x - x0) / dx) * (width - 2 * margin)).toFixed(1),
        cy: (height - margin - ((p.y - y0) / dy) * (height - 2 * margin)).toFixed(1),
        r: radius,
        fill: colour(colourKey(p)),
        class: "point",
        dataset: { imageId: p.image_id, class: colourKey(p) ?? "" },
        onclick: () => showImage(p.image_id),
      },
      h("svg:title", { text: `image ${p.image_id}${p.label ? ` · ${p.label}` : ""}${p.prediction ? ` · predicted ${p.prediction} (${formatPercent(p.confidence)})` : ""}` }),
    ),
  );
  const svg = h("svg:svg", { viewBox: `0 0 ${width} ${height}`, class: "map-svg", role: "img", "aria-label": `Map of ${map.points.length} images` }, circles);
  replaceChildren(document.getElementById("map"), svg);
  replaceChildren(
    document.getElementById("map-legend"),
    classes.map((name) => h("span", { class: "chip", dataset: { class: name } }, swatch(colour(name)), name)),
    map.points.some((p) => colourKey(p) === null) && h("span", { class: "chip" }, swatch(NO_CLASS), "none"),
  );
  current.colours = Object.fromEntries(classes.map((name) => [name, colour(name)]));
}

/** A legend's colour square (styled through the CSSOM, which the page's policy allows). */
function swatch(colour) {
  const node = h("span", { class: "swatch" });
  node.style.background = colour;
  return node;
}

/** A thumbnail of one image as an object URL, fetched once. */
function thumbnail(datasetId, imageId, size) {
  const key = `${datasetId}/${imageId}/${size}`;
  let url = thumbnails.get(key);
  if (!url) {
    url = datasetImage(datasetId, imageId, size).then((blob) => URL.createObjectURL(blob));
    thumbnails.set(key, url);
    url.catch(() => thumbnails.delete(key));
  }
  return url;
}

function image(datasetId, imageId, size, alt) {
  const img = h("img", { alt, width: size, height: size });
  thumbnail(datasetId, imageId, size).then(
    (src) => (img.src = src),
    () => img.classList.add("missing"),
  );
  return img;
}

async function showImage(imageId) {
  const { datasetId, modelId } = chosen();
  const panel = document.getElementById("map-detail");
  const point = current?.map?.points.find((p) => p.image_id === imageId);
  for (const circle of document.querySelectorAll("#map .point.picked")) circle.classList.remove("picked");
  document.querySelector(`#map .point[data-image-id="${imageId}"]`)?.classList.add("picked");
  panel.hidden = false;
  const neighbours = h("div", { class: "neighbours" }, h("span", { class: "muted", text: "Finding its nearest neighbours…" }));
  replaceChildren(
    panel,
    h("div", { class: "picked-image" }, image(datasetId, imageId, 128, `image ${imageId}`)),
    h("div", { class: "name", text: `Image ${imageId}` }),
    h("div", { class: "muted", text: point?.label ? `label: ${point.label}` : "unlabelled" }),
    point?.prediction && h("div", { class: "muted", text: `predicted: ${point.prediction} (${formatPercent(point.confidence)})` }),
    h("h3", { text: "Nearest neighbours" }),
    neighbours,
  );
  try {
    const found = await searchSimilar(datasetId, modelId, imageId, NEIGHBOURS);
    replaceChildren(
      neighbours,
      found.results.map((hit) =>
        h(
          "button",
          { type: "button", class: "neighbour", dataset: { imageId: hit.image_id }, title: `image ${hit.image_id}${hit.label ? ` · ${hit.label}` : ""}`, onclick: () => showImage(hit.image_id) },
          image(datasetId, hit.image_id, 64, `neighbour ${hit.image_id}`),
          h("span", { class: "score", text: hit.score.toFixed(3) }),
        ),
      ),
    );
  } catch (error) {
    replaceChildren(neighbours, h("span", { class: "status-error", text: error.message }));
  }
}

// The labelling view.

function resetGrid() {
  grid.selection = null;
  grid.assigned.clear();
  grid.focus = 0;
  grid.classes = [];
  document.getElementById("labelling").hidden = true;
  document.getElementById("labels-status").textContent = "";
}

async function chooseImages(event) {
  event.preventDefault();
  const form = event.target;
  const { datasetId, modelId, dataset } = chosen();
  const status = document.getElementById("labels-status");
  try {
    const selection = await selectImages(datasetId, {
      model_id: modelId,
      budget: Number(form.budget.value),
      strategy: form.strategy.value,
    });
    grid.selection = selection;
    grid.assigned.clear();
    grid.focus = 0;
    grid.classes = [...new Set([...(dataset?.classes ?? []), ...grid.classes])];
    document.getElementById("labelling").hidden = false;
    status.textContent = "";
    drawGrid();
    document.getElementById("label-grid").focus();
  } catch (error) {
    toast(`Could not choose images: ${error.message}`, "error");
  }
}

function addClass(event) {
  event.preventDefault();
  const input = event.target.elements.name;
  const name = input.value.trim();
  if (!name) return;
  if (!grid.classes.includes(name)) grid.classes.push(name);
  input.value = "";
  drawGrid();
}

/** Gives the focused image class `index` (or none) and moves to the next. */
function assign(index) {
  const image = grid.selection?.images[grid.focus];
  if (!image) return;
  if (index === null) grid.assigned.delete(image.image_id);
  else grid.assigned.set(image.image_id, grid.classes[index]);
  grid.focus = Math.min(grid.focus + 1, grid.selection.images.length - 1);
  drawGrid();
}

function gridKey(event) {
  if (!grid.selection) return;
  const count = grid.selection.images.length;
  const digit = Number(event.key);
  if (Number.isInteger(digit) && digit >= 1 && digit <= Math.min(9, grid.classes.length)) assign(digit - 1);
  else if (event.key === "0" || event.key === "Backspace" || event.key === "Delete") assign(null);
  else if (event.key === "ArrowRight") grid.focus = Math.min(grid.focus + 1, count - 1);
  else if (event.key === "ArrowLeft") grid.focus = Math.max(grid.focus - 1, 0);
  else return;
  event.preventDefault();
  drawGrid();
}

function drawGrid() {
  const { datasetId } = chosen();
  replaceChildren(
    document.getElementById("class-buttons"),
    grid.classes.map((name, index) =>
      h("button", { type: "button", class: "class-button", dataset: { class: name }, onclick: () => assign(index) }, index < 9 && h("kbd", { text: String(index + 1) }), name),
    ),
    grid.classes.length === 0 && h("span", { class: "muted", text: "No classes yet: add the first one." }),
  );
  const images = grid.selection?.images ?? [];
  replaceChildren(
    document.getElementById("label-grid"),
    images.map((item, index) => {
      const label = grid.assigned.get(item.image_id);
      return h(
        "div",
        {
          class: `label-cell${index === grid.focus ? " focused" : ""}${label ? " labelled" : ""}`,
          dataset: { imageId: item.image_id },
          title: item.path,
          onclick: () => {
            grid.focus = index;
            drawGrid();
          },
        },
        image(datasetId, item.image_id, 96, `image ${item.image_id}`),
        h("span", { class: "cell-label", text: label ?? "—" }),
      );
    }),
  );
  const done = grid.assigned.size;
  document.getElementById("save-labels").disabled = done === 0;
  document.getElementById("label-count").textContent = `${done} of ${images.length} labelled`;
}

async function saveLabels() {
  const { datasetId } = chosen();
  const status = document.getElementById("labels-status");
  const rows = [...grid.assigned].map(([imageId, label]) => `${imageId},${csvField(label)}`);
  try {
    const summary = await putLabels(datasetId, `image_id,label\n${rows.join("\n")}\n`);
    status.textContent = `Saved ${rows.length} labels as version ${summary.version}: ${summary.labelled} images labelled in ${summary.classes.length} classes.`;
    status.className = "status status-ok";
    toast(`Labels saved (version ${summary.version}).`, "ok");
    await ctx.refresh();
  } catch (error) {
    status.textContent = `Not saved: ${error.message}`;
    status.className = "status status-error";
  }
}

/** A CSV field, quoted when it holds a comma, a quote or a line break. */
function csvField(text) {
  return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}
