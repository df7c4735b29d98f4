// Drives the dashboard in Debian's headless Chromium, the way a person would:
// sees the uploaded dataset and its samples, uploads another archive through
// the drop zone, watches the pretraining job succeed and opens its curves,
// fine-tunes the encoder from the form, classifies an image dropped on the
// classify zone, and reads a job's event stream (scripted, on a made-up job,
// since the server may have none). Saves a screenshot of each view.
//
// Usage: node dashboard.mjs <base-url> <dir>
// <dir> must hold probe.png (an image to classify) and unlabelled.zip; the
// screenshots are written there. The server must have a dataset named
// "shapes" (labelled: disc, horizontal, vertical) and a pretraining job on it.

import { check, launchChromium } from "./harness.mjs";
import { join } from "node:path";

const [baseUrl, dir, API_KEY] = process.argv.slice(2);
if (!baseUrl || !dir || !API_KEY) {
  console.error("usage: node dashboard.mjs <base-url> <dir> <api-key>");
  process.exit(2);
}

const JOB_TIMEOUT_MS = 240_000;
const FINETUNE_CONFIG = { transfer: "fine_tune", epochs: 15, min_steps: 60, batch_size: 16, learning_rate: 0.003, val_fraction: 0.2 };



const browser = await launchChromium();
const context = await browser.newContext({ viewport: { width: 1366, height: 860 } });
const page = await context.newPage();

// The page must run without script errors. A 404 for the job event stream is
// expected where the server has none: the page then polls. Until the key is
// entered, the API answers 401.
const pageErrors = [];
let keyEntered = false;
page.on("pageerror", (error) => pageErrors.push(String(error)));
page.on("console", (message) => {
  if (message.type() !== "error") return;
  const url = message.location()?.url ?? "";
  if (/\/v1\/jobs\/[^/]+\/events$/.test(url)) return;
  if (!keyEntered && message.text().includes("401")) return;
  pageErrors.push(message.text());
});
const apiRequests = [];
page.on("request", (request) => {
  if (new URL(request.url()).pathname.startsWith("/v1/")) {
    apiRequests.push({ path: new URL(request.url()).pathname, auth: request.headers()["authorization"] ?? null });
  }
});

/** Saves a full-page screenshot, without the transient toasts. */
async function shot(name) {
  await page.locator(".toast").evaluateAll((toasts) => toasts.forEach((t) => t.remove()));
  await page.screenshot({ path: join(dir, name), fullPage: true });
}

/** A job as the API returns it, for the event stream check. */
function fakeJob(id, state) {
  const done = state === "succeeded";
  return {
    id,
    kind: "pretrain",
    state,
    dataset_id: null,
    base_model_id: null,
    config: {},
    progress: { epoch: done ? 2 : 0, epochs: 2, step: done ? 10 : 0, steps: 10, checkpoint_step: 0 },
    latest_metrics: {},
    model_id: null,
    error: null,
    attempts: 1,
    max_attempts: 3,
    cancel_requested: false,
    device: "cpu",
    created_at: new Date().toISOString(),
    started_at: new Date().toISOString(),
    finished_at: done ? new Date().toISOString() : null,
  };
}

/** An event stream as `GET /v1/jobs/{id}/events` sends it, with both line endings. */
function eventStream(id) {
  const at = new Date().toISOString();
  const event = (name, data, eol = "\n") => `event: ${name}${eol}data: ${JSON.stringify({ id, ...data })}${eol}${eol}`;
  return [
    ": comments are ignored\n",
    event("progress", { epoch: 1, epochs: 2, step: 5, steps: 10, checkpoint_step: 0 }),
    event("metric", { step: 5, epoch: 1, name: "loss", value: 1.5, at }),
    event("metric", { step: 10, epoch: 2, name: "loss", value: 0.75, at }, "\r\n"),
    event("state", { state: "succeeded" }),
    event("end", { state: "succeeded" }),
  ].join("");
}

try {
  // The page and the readiness badge.
  await page.goto(baseUrl);
  check((await page.title()) === "pretext", "the page loads");
  await page.locator("#health.health-ok").waitFor();
  check(/ready · \d+ worker/.test(await page.locator("#health").textContent()), "the readiness badge says ready");

  // Without a key the API answers 401 and the page asks for one.
  await page.locator(".key-field.needs-key").waitFor();
  await page.locator(".toast", { hasText: "needs an API key" }).waitFor();
  check(true, "without a key, the page asks for one");

  // The API key is kept and sent.
  keyEntered = true;
  await page.locator("#api-key").fill(API_KEY);
  await page.locator("#api-key").press("Tab");
  await page.locator(".toast", { hasText: "API key saved" }).waitFor();
  check((await page.evaluate(() => localStorage.getItem("pretext.apiKey"))) === API_KEY, "the API key is stored in localStorage");
  const sentBefore = apiRequests.length;
  await page.reload();
  await page.locator("#datasets-table tbody tr").first().waitFor();
  const sent = apiRequests.slice(sentBefore);
  check(sent.length > 0 && sent.every((r) => r.auth === `Bearer ${API_KEY}`), "every API call after a reload carries the bearer key");

  // Datasets: the uploaded one, its class counts and its samples.
  const shapes = page.locator("#datasets-table tbody tr", { has: page.locator(".name", { hasText: /^shapes$/ }) });
  await shapes.waitFor();
  const cells = shapes.locator("td");
  check((await cells.nth(1).textContent()).startsWith("90"), "the dataset shows 90 images");
  check((await cells.nth(2).textContent()) === "yes", "the dataset is labelled");
  for (const name of ["disc", "horizontal", "vertical"]) {
    check((await cells.nth(3).locator(".chip", { hasText: name }).textContent()) === `${name} 30`, `class ${name} shows 30 images`);
  }
  await shapes.click();
  const thumbnails = page.locator(".samples-row .samples img");
  await page.waitForFunction(() => {
    const images = [...document.querySelectorAll(".samples-row .samples img")];
    return images.length === 16 && images.every((img) => img.complete && img.naturalWidth > 0);
  });
  check((await thumbnails.count()) === 16, "16 sample thumbnails load");

  // Upload a second archive through the drop zone's file input.
  await page.locator("#dataset-name").fill("unlabelled shapes");
  await page.locator("#archive-input").setInputFiles(join(dir, "unlabelled.zip"));
  await page.locator("#upload-status.status-ok").waitFor();
  check((await page.locator("#upload-status").textContent()).includes("unlabelled"), "the drop zone uploads an archive");
  const unlabelled = page.locator("#datasets-table tbody tr", { has: page.locator(".name", { hasText: "unlabelled shapes" }) });
  await unlabelled.waitFor();
  check((await unlabelled.locator("td").nth(2).textContent()) === "no", "the new dataset is listed as unlabelled");
  // Show the labelled dataset's samples in the screenshot, not the new one's.
  await unlabelled.click();
  await page.waitForFunction(() => document.querySelectorAll(".samples-row").length === 1);
  await page.waitForFunction(() => [...document.querySelectorAll(".samples-row img")].every((img) => img.complete && img.naturalWidth > 0));
  await shot("dashboard-datasets.png");

  // Jobs: the pretraining job reaches succeeded with a full progress bar.
  await page.locator(".tabs a[data-tab=jobs]").click();
  const pretrain = page.locator("#jobs-table tbody tr", { has: page.locator(".kind-pretrain") }).first();
  await pretrain.waitFor();
  await page.locator("#jobs-table tbody tr[data-state=succeeded]", { has: page.locator(".kind-pretrain") }).waitFor({ timeout: JOB_TIMEOUT_MS });
  check((await pretrain.locator("[role=progressbar]").getAttribute("aria-valuenow")) === "100", "the pretraining job succeeds with its progress bar at 100%");
  check(Number((await pretrain.locator("td.loss").textContent()).replace(/,/g, "")) > 0, "the jobs table shows the latest loss");

  // Its curves.
  await pretrain.click();
  const detail = page.locator("#job-detail");
  await detail.locator(".chart[data-chart=Loss] path.line").waitFor();
  check((await detail.locator(".chart[data-chart=Loss] circle").count()) >= 2, "the loss curve has points");
  check((await detail.locator(".chart[data-chart=Accuracy] path.line[data-series=pretext_accuracy]").count()) === 1, "the accuracy chart has the pretext accuracy");
  check((await detail.locator(".chart[data-chart^=Throughput] path.line").count()) === 1, "the throughput chart has a line");

  // Fine-tune the encoder from the form.
  await page.locator(".segmented label", { hasText: "Fine-tune" }).click();
  const form = page.locator("#job-form");
  await form.locator("select[name=base_model_id]").waitFor({ state: "visible" });
  const datasetValue = await form.locator("select[name=dataset_id] option", { hasText: /^shapes ·/ }).getAttribute("value");
  await form.locator("select[name=dataset_id]").selectOption(datasetValue);
  const baseModel = await form.locator("select[name=base_model_id]").inputValue();
  check(baseModel !== "", "the base model defaults to the encoder");
  await form.locator("textarea[name=config]").fill(JSON.stringify(FINETUNE_CONFIG, null, 2));
  await form.locator("button[type=submit]").click();
  await page.locator("#job-form-status.status-ok").waitFor();
  const finetuneId = await page.evaluate(() => location.hash.split("/")[1]);
  check(/^[0-9a-f-]{36}$/.test(finetuneId ?? ""), "the form queues a fine-tuning job and opens it");
  await detail.locator(".mode-live, .mode-polling, .mode-ended").waitFor();
  console.log(`ok - the job detail follows the job (${(await detail.locator(".mode").textContent()).trim()})`);

  // Curves grow while it runs; the table row ends at succeeded.
  await detail.locator(".chart[data-chart=Loss] circle").first().waitFor({ timeout: JOB_TIMEOUT_MS });
  const finetuneRow = page.locator(`#jobs-table tbody tr[data-id="${finetuneId}"]`);
  await page.locator(`#jobs-table tbody tr[data-id="${finetuneId}"][data-state=succeeded]`).waitFor({ timeout: JOB_TIMEOUT_MS });
  check((await finetuneRow.locator("[role=progressbar]").getAttribute("aria-valuenow")) === "100", "the fine-tuning job succeeds with its progress bar at 100%");
  // Attached, not "visible": a validation accuracy that stays at 100 % draws
  // a flat line, whose empty bounding box Playwright counts as hidden.
  const valLine = detail.locator(".chart[data-chart=Accuracy] path.line[data-series=val_accuracy]");
  await valLine.waitFor({ state: "attached" });
  check(((await valLine.getAttribute("d")) ?? "").includes("L"), "the accuracy chart draws the validation accuracy through its points");
  check((await detail.locator(".chart[data-chart=Loss] circle").count()) >= 5, "the fine-tuning loss curve has its points");
  check((await detail.locator(".badge.state-succeeded").count()) === 1, "the job detail shows the job succeeded");
  await page.evaluate(() => window.scrollTo(0, 0));
  await shot("dashboard-jobs.png");

  // Models: the encoder and the classifier, then classify the probe image.
  await page.locator(".tabs a[data-tab=models]").click();
  await page.locator("#models-table tbody tr[data-kind=classifier]").waitFor();
  check((await page.locator("#models-table tbody tr[data-kind=encoder]").count()) === 1, "the models table lists the encoder");
  const classifier = page.locator("#models-table tbody tr[data-kind=classifier]");
  check(/val acc \d+(\.\d)?%/.test(await classifier.locator(".metrics").textContent()), "the classifier shows its validation accuracy");
  await classifier.locator("button", { hasText: "Classify" }).click();
  await page.locator("#image-input").setInputFiles(join(dir, "probe.png"));
  const predictions = page.locator(".prediction-list li");
  await predictions.first().waitFor();
  check((await predictions.count()) === 3, "three labels come back for a three-class model");
  const labels = await predictions.locator(".label").allTextContents();
  check(["disc", "horizontal", "vertical"].every((l) => labels.includes(l)), `the labels are the classes (top: ${labels[0]})`);
  const scores = (await predictions.locator(".score").allTextContents()).map((s) => parseFloat(s));
  check(scores.every((s, i) => i === 0 || s <= scores[i - 1]), "the scores are sorted");
  const width = await predictions.first().locator(".bar-fill").evaluate((el) => el.getBoundingClientRect().width);
  check(width > 0, "the top score has a bar");
  await page.waitForFunction(() => {
    const img = document.querySelector("#classify-card .preview img");
    return img && img.complete && img.naturalWidth > 0;
  });
  await shot("dashboard-classify.png");

  // The job view reads the event stream where the server has one. This
  // checks the reading on a made-up job whose every answer is scripted.
  const fakeId = "01900000-0000-7000-8000-00000000abcd";
  let jobReads = 0;
  let metricReads = 0;
  await page.route(`**/v1/jobs/${fakeId}`, (route) => {
    jobReads += 1;
    return route.fulfill({ json: fakeJob(fakeId, jobReads === 1 ? "running" : "succeeded") });
  });
  await page.route(`**/v1/jobs/${fakeId}/metrics`, (route) => {
    metricReads += 1;
    return route.fulfill({ json: { points: [] } });
  });
  await page.route(`**/v1/jobs/${fakeId}/events`, (route) =>
    route.fulfill({ status: 200, headers: { "content-type": "text/event-stream" }, body: eventStream(fakeId) }),
  );
  await page.evaluate((id) => (location.hash = `jobs/${id}`), fakeId);
  await detail.locator(".badge.state-succeeded").waitFor();
  await page.waitForFunction(() => document.querySelectorAll("#job-detail .chart[data-chart=Loss] circle").length === 2);
  const titles = await detail.locator(".chart[data-chart=Loss] circle title").allTextContents();
  check(titles.join() === "loss at step 5: 1.5,loss at step 10: 0.75", "metric events from the stream are drawn");
  check(metricReads === 1 && jobReads === 2, "a state event rereads the job, and nothing is polled while the stream works");
  await page.unrouteAll();
  await page.evaluate(() => (location.hash = "jobs"));

  check(pageErrors.length === 0, `no script errors${pageErrors.length ? `: ${pageErrors.join(" | ")}` : ""}`);
} catch (error) {
  console.error(`not ok - ${error.message}`);
  await page.screenshot({ path: join(dir, "failure.png"), fullPage: true }).catch(() => {});
  if (pageErrors.length) console.error(`script errors: ${pageErrors.join(" | ")}`);
  await browser.close();
  process.exit(1);
}
await browser.close();
