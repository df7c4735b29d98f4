// The Datasets tab: uploading an archive (drop zone, progress) and the table
// of datasets, whose rows open a strip of sample images.

import { sampleImage, uploadArchive } from "./api.js";
import { dropZone, formatBytes, h, replaceChildren, shortId, timeAgo, toast } from "./dom.js";

const SAMPLES = 16;
const MAX_CLASS_CHIPS = 8;

let ctx;
let signature = "";
const expanded = new Set();
/** Object URLs of fetched samples (promised), by `datasetId/n`; a dataset's images never change. */
const sampleUrls = new Map();

export function init(context) {
  ctx = context;
  const zone = document.getElementById("archive-drop");
  dropZone(zone, document.getElementById("archive-input"), upload);
}

async function upload(file) {
  const zone = document.getElementById("archive-drop");
  const status = document.getElementById("upload-status");
  const bar = zone.querySelector(".upload-progress");
  const nameInput = document.getElementById("dataset-name");
  zone.classList.add("busy");
  bar.hidden = false;
  status.className = "status";
  status.textContent = `Uploading ${file.name} (${formatBytes(file.size)})…`;
  try {
    const dataset = await uploadArchive(file, nameInput.value.trim(), (fraction) => {
      bar.firstElementChild.style.width = `${(fraction * 100).toFixed(1)}%`;
      if (fraction >= 1) status.textContent = `Reading the images of ${file.name}…`;
    });
    const classes = dataset.labeled ? `, ${dataset.classes.length} classes` : ", unlabelled";
    const skipped = dataset.skipped_count > 0 ? ` (${dataset.skipped_count} entries skipped)` : "";
    status.textContent = `Stored “${dataset.name}”: ${dataset.num_images} images${classes}${skipped}.`;
    status.className = "status status-ok";
    nameInput.value = "";
    toast(`Dataset “${dataset.name}” uploaded.`, "ok");
    expanded.add(dataset.id);
    await ctx.refresh();
  } catch (error) {
    status.textContent = `Upload failed: ${error.message}`;
    status.className = "status status-error";
  } finally {
    zone.classList.remove("busy");
    bar.hidden = true;
    bar.firstElementChild.style.width = "0";
  }
}

export function render() {
  const { datasets } = ctx.store;
  const next = JSON.stringify(datasets) + [...expanded].join() + (ctx.store.models.length > 0);
  if (next === signature) return;
  signature = next;
  const table = document.getElementById("datasets-table");
  table.nextElementSibling.hidden = datasets.length > 0;
  table.hidden = datasets.length === 0;
  replaceChildren(table.tBodies[0], datasets.flatMap((dataset) => rows(dataset)));
}

function rows(dataset) {
  const open = expanded.has(dataset.id);
  const toggle = () => {
    if (open) expanded.delete(dataset.id);
    else expanded.add(dataset.id);
    render();
  };
  const row = h(
    "tr",
    { class: `clickable${open ? " selected" : ""}`, dataset: { id: dataset.id }, onclick: toggle, "aria-expanded": String(open) },
    h("td", {}, h("div", { class: "name", text: dataset.name }), h("div", { class: "muted mono", text: shortId(dataset.id) })),
    h("td", { class: "num" }, h("div", { text: dataset.num_images.toLocaleString("en-US") }), h("div", { class: "muted", text: formatBytes(dataset.bytes) })),
    h("td", {}, dataset.labeled ? h("span", { class: "badge badge-ok", text: "yes" }) : h("span", { class: "badge", text: "no" })),
    h("td", {}, classChips(dataset)),
    h("td", {}, timeAgo(dataset.created_at)),
    h(
      "td",
      { class: "actions" },
      h("button", { type: "button", text: "Pretrain", onclick: (event) => startJob(event, "pretrain", dataset) }),
      dataset.labeled && h("button", { type: "button", text: "Fine-tune", onclick: (event) => startJob(event, "finetune", dataset) }),
      ctx.store.models.length > 0 && h("button", { type: "button", text: "Explore", onclick: (event) => explore(event, dataset) }),
    ),
  );
  if (!open) return [row];
  return [row, h("tr", { class: "samples-row" }, h("td", { colspan: 6 }, samples(dataset)))];
}

function classChips(dataset) {
  if (!dataset.labeled) return h("span", { class: "muted", text: "—" });
  const chips = dataset.classes.slice(0, MAX_CLASS_CHIPS).map((name) =>
    h("span", { class: "chip" }, name, " ", h("span", { class: "chip-count", text: dataset.class_counts[name] ?? 0 })),
  );
  const more = dataset.classes.length - MAX_CLASS_CHIPS;
  return h("div", { class: "chips" }, chips, more > 0 && h("span", { class: "muted", text: `+${more} more` }));
}

function startJob(event, kind, dataset) {
  event.stopPropagation();
  ctx.showTab("jobs");
  ctx.prefillJob({ kind, datasetId: dataset.id });
}

function explore(event, dataset) {
  event.stopPropagation();
  ctx.showTab("explore");
  ctx.explore(dataset.id);
}

function samples(dataset) {
  const count = Math.min(SAMPLES, dataset.num_images);
  const strip = h("div", { class: "samples" });
  for (let n = 0; n < count; n += 1) {
    const img = h("img", { alt: `sample ${n} of ${dataset.name}`, loading: "lazy", width: 60, height: 60 });
    strip.append(img);
    const key = `${dataset.id}/${n}`;
    let url = sampleUrls.get(key);
    if (!url) {
      url = sampleImage(dataset.id, n).then((blob) => URL.createObjectURL(blob));
      sampleUrls.set(key, url);
      url.catch(() => sampleUrls.delete(key));
    }
    url.then(
      (src) => (img.src = src),
      () => img.classList.add("missing"),
    );
  }
  return h("div", {}, h("span", { class: "muted", text: count < dataset.num_images ? `The first ${count} of ${dataset.num_images} images` : `All ${count} images` }), strip);
}
