// The Jobs tab: the form that queues a pretraining or fine-tuning job, the
// jobs table with live progress bars, and one job's training curves, which
// grow as metric points arrive.

import { cancelJob, createJob, followJob, isTerminal } from "./api.js";
import { lineChart } from "./charts.js";
import { formatNumber, h, replaceChildren, shortId, timeAgo, toast } from "./dom.js";

/** The config a new job starts from, per kind; the server fills in the rest. */
const DEFAULT_CONFIG = {
  pretrain: { epochs: 10 },
  finetune: { epochs: 20, labels_per_class: 10 },
};

const percent = (value) => `${Number((value * 100).toFixed(1))}%`;

/** Which metrics go in which chart. */
const CHARTS = [
  { title: "Loss", names: ["loss", "val_loss", "train_eval_loss"], format: (v) => formatNumber(v) },
  { title: "Accuracy", names: ["pretext_accuracy", "knn_monitor_accuracy", "train_accuracy", "val_accuracy", "train_eval_accuracy"], format: percent, yDomain: [0, 1] },
  { title: "Throughput (images/s)", names: ["images_per_second"], format: (v) => formatNumber(v, 3) },
  { title: "Learning rate", names: ["learning_rate"], format: (v) => formatNumber(v, 2) },
];

let ctx;
let detail = null;

export function init(context) {
  ctx = context;
  const form = document.getElementById("job-form");
  form.config.value = pretty(DEFAULT_CONFIG.pretrain);
  for (const radio of form.kind) radio.addEventListener("change", () => setKind(radio.value));
  form.addEventListener("submit", submit);
}

const pretty = (value) => JSON.stringify(value, null, 2);

/** Switches the form's kind, replacing the config unless it was edited. */
function setKind(kind) {
  const form = document.getElementById("job-form");
  const other = kind === "pretrain" ? "finetune" : "pretrain";
  form.kind.value = kind;
  if (form.config.value.trim() === "" || form.config.value === pretty(DEFAULT_CONFIG[other])) {
    form.config.value = pretty(DEFAULT_CONFIG[kind]);
  }
  for (const field of form.querySelectorAll("[data-finetune-only]")) field.hidden = kind !== "finetune";
  renderForm();
}

/** Fills the form from another tab's button. */
export function prefill({ kind, datasetId, baseModelId }) {
  setKind(kind);
  const form = document.getElementById("job-form");
  if (datasetId) form.dataset_id.value = datasetId;
  if (baseModelId !== undefined) form.base_model_id.value = baseModelId;
  form.scrollIntoView({ behavior: "smooth", block: "start" });
  form.querySelector("button[type=submit]").focus({ preventScroll: true });
}

async function submit(event) {
  event.preventDefault();
  const form = event.target;
  const status = document.getElementById("job-form-status");
  const kind = form.kind.value;
  let config;
  try {
    config = form.config.value.trim() === "" ? null : JSON.parse(form.config.value);
  } catch (error) {
    status.textContent = `The config is not valid JSON: ${error.message}`;
    status.className = "status status-error";
    return;
  }
  const body = { kind, dataset_id: form.dataset_id.value, config };
  if (kind === "finetune" && form.base_model_id.value) body.base_model_id = form.base_model_id.value;
  status.textContent = "Queueing…";
  status.className = "status";
  try {
    const job = await createJob(body);
    status.textContent = `Queued ${kind} job ${shortId(job.id)}.`;
    status.className = "status status-ok";
    ctx.showTab("jobs", job.id);
    await ctx.refresh();
  } catch (error) {
    const fields = error.problem?.errors?.map((e) => `${e.field}: ${e.message}`) ?? [];
    status.textContent = fields.length > 1 ? `Refused: ${fields.join("; ")}` : `Refused: ${error.message}`;
    status.className = "status status-error";
  }
}

let formSignature = "";

/** Rebuilds the dataset and base-model choices when they change, keeping the selection. */
function renderForm() {
  const form = document.getElementById("job-form");
  const { datasets, models } = ctx.store;
  const kind = form.kind.value;
  const next = JSON.stringify([kind, datasets.map((d) => d.id), models.map((m) => m.id)]);
  if (next === formSignature) return;
  formSignature = next;

  const chosenDataset = form.dataset_id.value;
  replaceChildren(
    form.dataset_id,
    datasets.length === 0 && h("option", { value: "", text: "no datasets yet: upload one first" }),
    datasets.map((d) =>
      h("option", {
        value: d.id,
        disabled: kind === "finetune" && !d.labeled,
        text: `${d.name} · ${d.num_images} images${d.labeled ? ` · ${d.classes.length} classes` : " · unlabelled"} · ${shortId(d.id)}`,
      }),
    ),
  );
  const usable = datasets.filter((d) => kind !== "finetune" || d.labeled);
  form.dataset_id.value = usable.some((d) => d.id === chosenDataset) ? chosenDataset : (usable[0]?.id ?? "");

  const chosenBase = form.base_model_id.value;
  replaceChildren(
    form.base_model_id,
    h("option", { value: "", text: "none: train from scratch" }),
    models.map((m) => h("option", { value: m.id, text: `${m.kind} · ${m.backbone} · ${shortId(m.id)}` })),
  );
  const encoder = models.find((m) => m.kind === "encoder");
  form.base_model_id.value = models.some((m) => m.id === chosenBase) ? chosenBase : (encoder?.id ?? "");
}

export function render() {
  renderForm();
  renderTable();
}

function datasetName(id) {
  return ctx.store.datasets.find((d) => d.id === id)?.name ?? (id ? shortId(id) : "deleted");
}

/** Fraction of the planned steps done; a job that succeeded is whole. */
function fraction(job) {
  if (job.state === "succeeded") return 1;
  const { step, steps } = job.progress;
  return steps > 0 ? Math.min(1, step / steps) : 0;
}

function progressBar(job) {
  const done = fraction(job);
  const fill = h("div", { class: "bar-fill" });
  fill.style.width = `${(done * 100).toFixed(1)}%`;
  const { step, steps, epoch, epochs } = job.progress;
  return h(
    "div",
    { class: `progress state-${job.state}` },
    h("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": Math.round(done * 100), "aria-label": "progress" }, fill),
    h("span", { class: "progress-text", text: steps > 0 ? `${step}/${steps} · epoch ${epoch}/${epochs}` : job.state === "queued" ? "waiting" : "starting" }),
  );
}

function stateBadge(job) {
  const cancelling = job.cancel_requested && !isTerminal(job.state);
  return h("span", { class: `badge state state-${job.state}`, title: job.error ?? "", text: cancelling ? "cancelling" : job.state });
}

/** The freshest view of a job: the list's, or the followed job's when that is further on. */
function freshest(job) {
  const followed = detail?.job;
  if (followed?.id !== job.id || followed.state !== job.state) return job;
  return followed.progress.step > job.progress.step ? followed : job;
}

function renderTable() {
  const jobs = ctx.store.jobs.map(freshest);
  const table = document.getElementById("jobs-table");
  table.nextElementSibling.hidden = jobs.length > 0;
  table.hidden = jobs.length === 0;
  replaceChildren(
    table.tBodies[0],
    jobs.map((job) =>
      h(
        "tr",
        { class: `clickable${detail?.id === job.id ? " selected" : ""}`, dataset: { id: job.id, state: job.state }, onclick: () => ctx.showTab("jobs", job.id) },
        h("td", { class: "mono", text: shortId(job.id) }),
        h("td", {}, h("span", { class: `badge kind-${job.kind}`, text: job.kind })),
        h("td", { text: datasetName(job.dataset_id) }),
        h("td", {}, stateBadge(job)),
        h("td", {}, progressBar(job)),
        h("td", { class: "num loss", text: formatNumber(job.latest_metrics.loss) }),
        h("td", {}, timeAgo(job.created_at)),
        h(
          "td",
          { class: "actions" },
          !isTerminal(job.state) && !job.cancel_requested && h("button", { type: "button", class: "danger", text: "Cancel", onclick: (event) => cancel(event, job) }),
        ),
      ),
    ),
  );
}

async function cancel(event, job) {
  event.stopPropagation();
  try {
    await cancelJob(job.id);
    toast(`Cancelling job ${shortId(job.id)}.`);
  } catch (error) {
    toast(`Could not cancel: ${error.message}`, "error");
  }
  await ctx.refresh();
}

/** Shows one job's details and curves and follows it live; null closes the panel. */
export function openDetail(id) {
  if (detail?.id === id) return;
  detail?.stop();
  detail = null;
  const panel = document.getElementById("job-detail");
  panel.hidden = id === null;
  if (id === null) {
    replaceChildren(panel);
    renderTable();
    return;
  }
  const current = { id, job: null, points: new Map(), mode: "connecting", frame: 0, stop: () => {} };
  detail = current;
  replaceChildren(panel, h("p", { class: "muted", text: "Loading…" }));
  const redraw = () => {
    if (current.frame || detail !== current) return;
    current.frame = requestAnimationFrame(() => {
      current.frame = 0;
      if (detail === current) renderDetail(panel, current);
    });
  };
  current.stop = followJob(id, {
    onJob: (job) => {
      current.job = job;
      const index = ctx.store.jobs.findIndex((j) => j.id === job.id);
      if (index >= 0) ctx.store.jobs[index] = job;
      renderTable();
      redraw();
    },
    onMetrics: (points) => {
      for (const p of points) current.points.set(`${p.name}@${p.step}`, p);
      redraw();
    },
    onMode: (mode) => {
      current.mode = mode;
      redraw();
    },
    onEnd: () => {
      current.mode = "ended";
      redraw();
      ctx.refresh();
    },
  });
  renderTable();
}

function renderDetail(panel, { job, points, mode }) {
  if (!job) return;
  const configOpen = panel.querySelector("details.config")?.open;
  const byName = new Map();
  for (const p of [...points.values()].sort((a, b) => a.step - b.step)) {
    if (!byName.has(p.name)) byName.set(p.name, []);
    byName.get(p.name).push(p);
  }
  const modeText = { live: "live (event stream)", polling: "polling every 2 s", ended: "finished", connecting: "connecting" }[mode];
  const fact = (label, value) => [h("dt", { text: label }), h("dd", {}, value)];
  const modelLink = job.model_id
    ? h("a", { href: "#models", text: shortId(job.model_id), class: "mono" })
    : "—";
  replaceChildren(
    panel,
    h(
      "div",
      { class: "card-head" },
      h("h2", { text: `${job.kind === "pretrain" ? "Pretraining" : "Fine-tuning"} job ${shortId(job.id)}` }),
      stateBadge(job),
      h("span", { class: `mode mode-${mode}`, text: modeText }),
      h("button", { type: "button", class: "close", "aria-label": "Close", text: "×", onclick: () => ctx.showTab("jobs") }),
    ),
    h(
      "dl",
      { class: "facts" },
      fact("Dataset", datasetName(job.dataset_id)),
      fact("Base model", job.base_model_id ? h("span", { class: "mono", text: shortId(job.base_model_id) }) : "—"),
      fact("Progress", progressBar(job)),
      fact("Device", job.device ?? "—"),
      fact("Attempts", `${job.attempts} of ${job.max_attempts}`),
      fact("Started", timeAgo(job.started_at)),
      fact("Finished", timeAgo(job.finished_at)),
      fact("Model", modelLink),
    ),
    job.error && h("p", { class: "error-box", text: job.error }),
    h(
      "div",
      { class: "charts" },
      CHARTS.map((chart) =>
        lineChart({
          title: chart.title,
          format: chart.format,
          yDomain: chart.yDomain,
          series: chart.names.filter((name) => byName.has(name)).map((name) => ({ name, points: byName.get(name) })),
        }),
      ),
    ),
    h("details", { class: "config", open: configOpen }, h("summary", { text: "Config" }), h("pre", { text: pretty(job.config) })),
  );
}
