// The dashboard's shell: tabs, the API key field, the readiness badge, and
// one refresh loop that keeps the lists of datasets, jobs and models fresh
// (every two seconds while a job is queued or running, else every ten).

import { apiKey, isTerminal, listDatasets, listJobs, listModels, readiness, setApiKey } from "./api.js";
import { toast } from "./dom.js";
import * as datasetsView from "./datasets.js";
import * as exploreView from "./explore.js";
import * as jobsView from "./jobs.js";
import * as modelsView from "./models.js";

const ACTIVE_INTERVAL_MS = 2000;
const IDLE_INTERVAL_MS = 10000;
const TABS = ["datasets", "jobs", "models", "explore"];

/** What every view reads and may ask for. */
const ctx = {
  store: { datasets: [], jobs: [], models: [] },
  refresh,
  showTab,
  prefillJob: (options) => jobsView.prefill(options),
  explore: (datasetId) => exploreView.open(datasetId),
};

let timer = null;
let generation = 0;
let lastError = null;

/** Reloads the lists, renders the views, and schedules the next refresh. */
async function refresh() {
  clearTimeout(timer);
  const current = ++generation;
  try {
    const [datasets, jobs, models] = await Promise.all([listDatasets(), listJobs(), listModels()]);
    // A later refresh started meanwhile: its answer is the fresher one.
    if (current !== generation) return;
    Object.assign(ctx.store, { datasets, jobs, models });
    lastError = null;
    datasetsView.render();
    jobsView.render();
    modelsView.render();
    exploreView.render();
  } catch (error) {
    if (error.status === 401) askForKey(error.message);
    else if (error.message !== lastError) toast(`Could not load the lists: ${error.message}`, "error");
    lastError = error.message;
  }
  if (current !== generation) return;
  const busy = ctx.store.jobs.some((job) => !isTerminal(job.state));
  timer = setTimeout(refresh, busy ? ACTIVE_INTERVAL_MS : IDLE_INTERVAL_MS);
}

async function checkHealth() {
  const badge = document.getElementById("health");
  try {
    const ready = await readiness();
    badge.textContent = `ready · ${ready.workers} worker${ready.workers === 1 ? "" : "s"}`;
    badge.className = "health health-ok";
  } catch (error) {
    badge.textContent = "unreachable";
    badge.title = error.message;
    badge.className = "health health-bad";
  }
}

/** Shows one tab; `#jobs/<id>` also opens that job's curves. */
function showTab(name, detail) {
  location.hash = detail ? `${name}/${detail}` : name;
}

function route() {
  const [name, detail] = location.hash.slice(1).split("/");
  const tab = TABS.includes(name) ? name : "datasets";
  for (const section of document.querySelectorAll(".view")) section.hidden = section.dataset.view !== tab;
  for (const link of document.querySelectorAll(".tabs a")) {
    link.classList.toggle("active", link.dataset.tab === tab);
    if (link.dataset.tab === tab) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (tab === "jobs") jobsView.openDetail(detail ?? null);
  if (tab === "explore") exploreView.show();
}

/** Points at the key field after a 401: the server wants a (valid) key. */
function askForKey(detail) {
  const input = document.getElementById("api-key");
  input.closest(".key-field").classList.add("needs-key");
  if (detail !== lastError) {
    toast(
      apiKey()
        ? "The server refused this API key (unknown or revoked): paste a valid one in the API key field."
        : "The server needs an API key: paste the one it printed at first start (or PRETEXT_API_KEY) in the API key field.",
      "error",
    );
  }
  if (document.activeElement !== input) input.focus();
}

function setUpKeyField() {
  const input = document.getElementById("api-key");
  input.value = apiKey();
  input.addEventListener("change", () => {
    const key = input.value.trim();
    setApiKey(key);
    input.closest(".key-field").classList.remove("needs-key");
    toast(key ? "API key saved in this browser." : "API key removed.");
    refresh();
    checkHealth();
  });
}

setUpKeyField();
datasetsView.init(ctx);
jobsView.init(ctx);
modelsView.init(ctx);
exploreView.init(ctx);
window.addEventListener("hashchange", route);
route();
refresh();
checkHealth();
setInterval(checkHealth, IDLE_INTERVAL_MS);
document.addEventListener("visibilitychange", () => {
  if (!document.hidden) refresh();
});
