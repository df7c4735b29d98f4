// Drives the dashboard's Explore tab in Debian's headless Chromium: computes
// a dataset's embeddings from the map card, checks the map's points, opens an
// image and its nearest neighbours, chooses images to label, labels them by
// key, saves, and sees the map recoloured; the saved labels are read back
// from the API and the map's screenshot must show each class's colour.
//
// Usage: node explore.mjs <base-url> <dir> <api-key>
// The server must hold one dataset, "loop", of 24 unlabelled images named
// 00.png … 23.png, where image n is a disc, a horizontal or a vertical bar as
// n % 3 is 0, 1 or 2, and one encoder pretrained on it. Screenshots go to <dir>.

import { check, launchChromium } from "./harness.mjs";
import { join } from "node:path";

const [baseUrl, dir, API_KEY] = process.argv.slice(2);
if (!baseUrl || !dir || !API_KEY) {
  console.error("usage: node explore.mjs <base-url> <dir> <api-key>");
  process.exit(2);
}
const CLASSES = ["disc", "horizontal", "vertical"];
const IMAGES = 24;
const BUDGET = 6;
const NO_CLASS = "#c7cbd6";
const JOB_TIMEOUT_MS = 120_000;



const browser = await launchChromium();
const context = await browser.newContext({ viewport: { width: 1366, height: 900 } });
await context.addInitScript((key) => localStorage.setItem("pretext.apiKey", key), API_KEY);
const page = await context.newPage();

// No script errors. The map answers 409 until the dataset is embedded.
const pageErrors = [];
page.on("pageerror", (error) => pageErrors.push(String(error)));
page.on("console", (message) => {
  if (message.type() !== "error") return;
  const url = message.location()?.url ?? "";
  if (/\/v1\/datasets\/[^/]+\/map\?/.test(url) && message.text().includes("409")) return;
  if (/\/v1\/jobs\/[^/]+\/events$/.test(url)) return;
  pageErrors.push(`${message.text()} (${url})`);
});

/** An API answer read with the page's key, as the page itself would. */
const api = (path, init = {}) =>
  page.evaluate(
    async ([path, init, key]) => {
      const response = await fetch(path, { ...init, headers: { Authorization: `Bearer ${key}` } });
      return { status: response.status, body: await response.json() };
    },
    [path, init, API_KEY],
  );

/** How many pixels of a PNG (base64) are within a small distance of each colour. */
function countColours(png, colours) {
  return page.evaluate(
    async ([png, colours]) => {
      // A blob URL, as the page's content security policy allows.
      const bytes = Uint8Array.from(atob(png), (c) => c.charCodeAt(0));
      const image = new Image();
      image.src = URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
      await image.decode();
      const canvas = document.createElement("canvas");
      [canvas.width, canvas.height] = [image.naturalWidth, image.naturalHeight];
      const context2d = canvas.getContext("2d");
      context2d.drawImage(image, 0, 0);
      const { data } = context2d.getImageData(0, 0, canvas.width, canvas.height);
      const targets = colours.map((hex) => [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16)));
      const counts = colours.map(() => 0);
      for (let p = 0; p < data.length; p += 4) {
        targets.forEach(([r, g, b], i) => {
          if (Math.abs(data[p] - r) + Math.abs(data[p + 1] - g) + Math.abs(data[p + 2] - b) <= 12) counts[i] += 1;
        });
      }
      return counts;
    },
    [png, colours],
  );
}

try {
  await page.goto(`${baseUrl}/#explore`);
  check((await page.title()) === "pretext", "the page loads on the Explore tab");
  const circles = page.locator("#map svg circle.point");

  // Not embedded yet: the card offers to compute the embeddings.
  const embed = page.locator("#explore-embed");
  await embed.waitFor({ state: "visible" });
  check((await page.locator("#explore-status").textContent()).includes("compute its embeddings"), "an unembedded dataset offers to compute its embeddings");
  await embed.click();
  await page.waitForFunction((n) => document.querySelectorAll("#map svg circle.point").length === n, IMAGES, { timeout: JOB_TIMEOUT_MS });
  check(true, `the embed job runs and the map draws ${IMAGES} points`);
  check(/24 images; the axes hold \d+(\.\d)?% and \d+(\.\d)?% of the variance/.test(await page.locator("#explore-status").textContent()), "the map says how much variance its axes hold");
  const fills = await circles.evaluateAll((nodes) => nodes.map((n) => n.getAttribute("fill")));
  check(fills.every((f) => f === NO_CLASS), "unlabelled points are grey");
  check((await page.locator("#map-legend .chip").textContent()).includes("none"), "the legend names the unlabelled points");

  // A point: its image and its nearest neighbours, most similar first.
  await page.locator('#map circle.point[data-image-id="4"]').click();
  const detail = page.locator("#map-detail");
  await detail.locator(".neighbour").nth(7).waitFor();
  await page.waitForFunction(() => [...document.querySelectorAll("#map-detail img")].every((img) => img.complete && img.naturalWidth > 0));
  check((await detail.locator(".name").textContent()) === "Image 4", "a click on a point shows that image");
  const scores = (await detail.locator(".neighbour .score").allTextContents()).map(Number);
  check(scores.length === 8 && scores.every((s, i) => i === 0 || s <= scores[i - 1]), "its 8 nearest neighbours load, most similar first");
  const neighbourIds = await detail.locator(".neighbour").evaluateAll((nodes) => nodes.map((n) => Number(n.dataset.imageId)));
  check(!neighbourIds.includes(4), "the image is not its own neighbour");
  check((await page.locator("#map circle.point.picked").getAttribute("data-image-id")) === "4", "the picked point is marked on the map");

  // Choose images to label, add the classes, and label them by key.
  await page.locator("#selection-form input[name=budget]").fill(String(BUDGET));
  await page.locator("#selection-form button[type=submit]").click();
  const cells = page.locator("#label-grid .label-cell");
  await cells.nth(BUDGET - 1).waitFor();
  check((await cells.count()) === BUDGET, `the service chooses ${BUDGET} images to label`);
  for (const name of CLASSES) {
    await page.locator("#new-class-form input[name=name]").fill(name);
    await page.locator("#new-class-form button").click();
  }
  check((await page.locator("#class-buttons .class-button").allTextContents()).join() === "1disc,2horizontal,3vertical", "added classes get the number keys 1, 2, 3");
  const paths = await cells.evaluateAll((nodes) => nodes.map((n) => n.title));
  const truth = paths.map((path) => CLASSES[Number(path.replace(".png", "")) % 3]);
  await page.locator("#label-grid").focus();
  for (const name of truth) await page.keyboard.press(String(CLASSES.indexOf(name) + 1));
  check((await page.locator("#label-count").textContent()) === `${BUDGET} of ${BUDGET} labelled`, "each key press labels the framed image and moves on");
  // 0 clears the framed (last) image; a click on a class button labels it again.
  await page.keyboard.press("0");
  check((await page.locator("#label-count").textContent()) === `${BUDGET - 1} of ${BUDGET} labelled`, "0 clears a label");
  await page.locator(`#class-buttons .class-button[data-class="${truth[BUDGET - 1]}"]`).click();
  check((await cells.locator(".cell-label").allTextContents()).join() === truth.join(), "every chosen image shows the class given to it");
  await page.waitForFunction(() => [...document.querySelectorAll("#label-grid img")].every((img) => img.complete && img.naturalWidth > 0));
  const gridShot = await page.locator("#labelling-card").screenshot({ path: join(dir, "dashboard-labelling.png") });
  check(gridShot.length > 0, "the labelling view is captured");

  await page.locator("#save-labels").click();
  await page.locator("#labels-status.status-ok").waitFor();
  check((await page.locator("#labels-status").textContent()).startsWith(`Saved ${BUDGET} labels as version 1`), "the labels are saved as version 1");

  // The API has them, each as given.
  const datasetId = await page.locator("#explore-dataset").inputValue();
  const labels = await api(`/v1/datasets/${datasetId}/labels`);
  check(labels.status === 200 && labels.body.version === 1 && labels.body.labelled === BUDGET, "the labels API reports version 1 with the new labels");
  const listed = await api(`/v1/datasets/${datasetId}/images?limit=100`);
  const chosenIds = await cells.evaluateAll((nodes) => nodes.map((n) => Number(n.dataset.imageId)));
  const saved = chosenIds.map((id) => listed.body.images.find((image) => image.id === id)?.label);
  check(saved.join() === truth.join(), "each image carries the class given in the grid");

  // The map recolours: the labelled points in their classes' colours.
  await page.waitForFunction((n) => document.querySelectorAll('#map svg circle.point:not([data-class=""])').length === n, BUDGET);
  const legend = await page.locator("#map-legend .chip[data-class]").evaluateAll((chips) => chips.map((c) => [c.dataset.class, c.querySelector(".swatch").style.background]));
  const byClass = new Map(legend);
  const coloured = await page.locator('#map circle.point:not([data-class=""])').evaluateAll((nodes) => nodes.map((n) => [n.dataset.class, n.getAttribute("fill")]));
  check(coloured.every(([name]) => byClass.has(name)), "the legend lists every class on the map");
  const usedColours = [...new Set(coloured.map(([, fill]) => fill))];
  check(usedColours.length === new Set(truth).size && !usedColours.includes(NO_CLASS), "each class has its own colour");

  // The screenshot shows them: every class's colour and the grey.
  await page.locator("#map").scrollIntoViewIfNeeded();
  const mapShot = await page.locator("#map svg").screenshot({ path: join(dir, "dashboard-map.png") });
  const counts = await countColours(mapShot.toString("base64"), [...usedColours, NO_CLASS]);
  check(counts.every((n) => n >= 10), `the map's screenshot shows each class colour and the grey (pixels: ${counts.join(", ")})`);

  await page.evaluate(() => window.scrollTo(0, 0));
  await page.locator(".toast").evaluateAll((toasts) => toasts.forEach((t) => t.remove()));
  await page.screenshot({ path: join(dir, "dashboard-explore.png"), fullPage: true });
  check(pageErrors.length === 0, `no script errors${pageErrors.length ? `: ${pageErrors.join(" | ")}` : ""}`);
} catch (error) {
  console.error(`not ok - ${error.message}`);
  await page.screenshot({ path: join(dir, "explore-failure.png"), fullPage: true }).catch(() => {});
  if (pageErrors.length) console.error(`script errors: ${pageErrors.join(" | ")}`);
  await browser.close();
  process.exit(1);
}
await browser.close();
