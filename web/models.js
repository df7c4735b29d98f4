// The Models tab: the table of encoders and classifiers with their final
// metrics, weight downloads, and a drop zone that classifies one image with a
// chosen classifier and shows the top labels as score bars.

import { classify, fetchBlob } from "./api.js";
import { dropZone, formatNumber, formatPercent, h, replaceChildren, shortId, timeAgo, toast } from "./dom.js";

const MAX_CLASS_CHIPS = 5;

let ctx;
let signature = "";
let previewUrl = null;

export function init(context) {
  ctx = context;
  dropZone(document.getElementById("image-drop"), document.getElementById("image-input"), classifyFile);
}

export function render() {
  const { models, datasets } = ctx.store;
  const next = JSON.stringify([models, datasets.map((d) => [d.id, d.name])]);
  if (next === signature) return;
  signature = next;
  const table = document.getElementById("models-table");
  table.nextElementSibling.hidden = models.length > 0;
  table.hidden = models.length === 0;
  replaceChildren(table.tBodies[0], models.map(row));
  renderClassifierChoice();
}

/** The headline metrics of a model, as label/value pairs. */
function headline(model) {
  const m = model.metrics;
  const pairs = [];
  if (model.kind === "encoder") {
    if (m.pretext_accuracy !== undefined) pairs.push(["pretext acc", formatPercent(m.pretext_accuracy)]);
    if (m.chance_accuracy !== undefined) pairs.push(["chance", formatPercent(m.chance_accuracy)]);
  } else {
    if (m.val_accuracy !== undefined) pairs.push(["val acc", formatPercent(m.val_accuracy)]);
    if (m.val_loss !== undefined) pairs.push(["val loss", formatNumber(m.val_loss)]);
    if (m.train_eval_accuracy !== undefined) pairs.push(["train acc", formatPercent(m.train_eval_accuracy)]);
    if (m.train_labels !== undefined) pairs.push(["labels", formatNumber(m.train_labels)]);
  }
  return pairs;
}

function row(model) {
  const classes = model.classes;
  const allMetrics = Object.entries(model.metrics)
    .map(([name, value]) => `${name}: ${formatNumber(value, 4)}`)
    .join("\n");
  return h(
    "tr",
    { dataset: { id: model.id, kind: model.kind } },
    h("td", {}, h("div", { class: "mono", text: shortId(model.id) }), h("div", { class: "muted nowrap", text: model.dataset_id ? `on ${datasetName(model.dataset_id)}` : "" })),
    h("td", {}, h("span", { class: `badge kind-${model.kind}`, text: model.kind })),
    h("td", { class: "mono", text: model.backbone }),
    h("td", { text: model.pretext ?? "—" }),
    h(
      "td",
      {},
      classes.length === 0
        ? h("span", { class: "muted", text: "—" })
        : h(
            "div",
            { class: "chips" },
            classes.slice(0, MAX_CLASS_CHIPS).map((c) => h("span", { class: "chip", text: c })),
            classes.length > MAX_CLASS_CHIPS && h("span", { class: "muted", text: `+${classes.length - MAX_CLASS_CHIPS} more` }),
          ),
    ),
    h(
      "td",
      { title: allMetrics },
      h(
        "div",
        { class: "metrics" },
        headline(model).map(([label, value]) => h("span", { class: "metric" }, h("span", { class: "muted", text: label }), " ", h("strong", { text: value }))),
      ),
    ),
    h("td", {}, timeAgo(model.created_at)),
    h(
      "td",
      { class: "actions" },
      model.kind === "classifier" && h("button", { type: "button", text: "Classify", onclick: () => chooseClassifier(model.id) }),
      h("button", { type: "button", text: "Fine-tune", onclick: () => finetuneFrom(model) }),
      h("button", { type: "button", text: "Weights", title: "Download the .safetensors weights", onclick: () => downloadWeights(model) }),
    ),
  );
}

function datasetName(id) {
  return ctx.store.datasets.find((d) => d.id === id)?.name ?? shortId(id);
}

/** Opens the job form on a fine-tuning job from `model`, on its dataset if that has labels. */
function finetuneFrom(model) {
  const dataset = ctx.store.datasets.find((d) => d.id === model.dataset_id);
  ctx.showTab("jobs");
  ctx.prefillJob({ kind: "finetune", datasetId: dataset?.labeled ? dataset.id : undefined, baseModelId: model.id });
}

async function downloadWeights(model) {
  try {
    const blob = await fetchBlob(`/v1/models/${model.id}/weights`);
    const url = URL.createObjectURL(blob);
    const link = h("a", { href: url, download: `${model.id}.safetensors` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (error) {
    toast(`Could not download the weights: ${error.message}`, "error");
  }
}

function renderClassifierChoice() {
  const select = document.getElementById("classifier-select");
  const classifiers = ctx.store.models.filter((m) => m.kind === "classifier");
  const chosen = select.value;
  replaceChildren(
    select,
    classifiers.length === 0 && h("option", { value: "", text: "no classifier yet: fine-tune an encoder first" }),
    classifiers.map((m) => {
      const accuracy = m.metrics.val_accuracy ?? m.metrics.train_eval_accuracy;
      const label = [shortId(m.id), `${m.classes.length} classes`, accuracy !== undefined ? `${formatPercent(accuracy)} val acc` : null];
      return h("option", { value: m.id, text: label.filter(Boolean).join(" · ") });
    }),
  );
  select.value = classifiers.some((m) => m.id === chosen) ? chosen : (classifiers[0]?.id ?? "");
}

function chooseClassifier(id) {
  const select = document.getElementById("classifier-select");
  select.value = id;
  document.getElementById("classify-card").scrollIntoView({ behavior: "smooth", block: "start" });
}

async function classifyFile(file) {
  const modelId = document.getElementById("classifier-select").value;
  const output = document.querySelector("#classify-card .predictions");
  const preview = document.querySelector("#classify-card .preview");
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  preview.querySelector("img").src = previewUrl;
  preview.hidden = false;
  if (!modelId) {
    replaceChildren(output, h("p", { class: "status status-error", text: "Choose a classifier first." }));
    return;
  }
  replaceChildren(output, h("p", { class: "muted", text: `Classifying ${file.name}…` }));
  try {
    const predictions = await classify(modelId, file, 5);
    replaceChildren(
      output,
      h("p", { class: "muted", text: `${file.name} · model ${shortId(modelId)}` }),
      h(
        "ol",
        { class: "prediction-list" },
        predictions.map((p, i) => {
          const fill = h("div", { class: "bar-fill" });
          fill.style.width = `${(p.score * 100).toFixed(1)}%`;
          return h(
            "li",
            { class: i === 0 ? "top" : "" },
            h("span", { class: "label", text: p.label }),
            h("div", { class: "bar", role: "meter", "aria-valuemin": 0, "aria-valuemax": 1, "aria-valuenow": p.score, "aria-label": p.label }, fill),
            h("span", { class: "score", text: formatPercent(p.score) }),
          );
        }),
      ),
    );
  } catch (error) {
    replaceChildren(output, h("p", { class: "status status-error", text: `Could not classify: ${error.message}` }));
  }
}
