// The client side of the /v1 API: the optional API key, JSON requests whose
// failures carry the server's problem+json `detail`, archive uploads with
// progress, and following a job live (Server-Sent Events, else polling).

const KEY_STORAGE = "pretext.apiKey";
const POLL_INTERVAL_MS = 2000;
const TERMINAL_STATES = ["succeeded", "failed", "cancelled"];

/** The API key kept in this browser, or "". */
export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) ?? "";
}

/** Keeps (or, when empty, forgets) the API key. */
export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

/** Request headers, with `Authorization: Bearer <key>` when a key is set. */
export function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

/** Whether a job in `state` will change no more. */
export function isTerminal(state) {
  return TERMINAL_STATES.includes(state);
}

/** A failed request; `message` is the server's `detail` when it sent one. */
export class ApiError extends Error {
  constructor(status, problem, fallback) {
    super(problem?.detail ?? fallback);
    this.status = status;
    this.problem = problem;
  }
}

async function failure(response) {
  let problem = null;
  try {
    if ((response.headers.get("content-type") ?? "").includes("json")) problem = await response.json();
  } catch {
    // Not JSON after all: the status line says enough.
  }
  return new ApiError(response.status, problem, `${response.status} ${response.statusText}`);
}

/** Sends a request; resolves to the parsed JSON (null for 204), rejects with ApiError. */
export async function request(method, path, { json, body, contentType } = {}) {
  const headers = authHeaders({ Accept: "application/json" });
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (contentType) {
    headers["Content-Type"] = contentType;
  }
  const response = await fetch(path, { method, headers, body });
  if (!response.ok) throw await failure(response);
  return response.status === 204 ? null : response.json();
}

/** Fetches a binary resource (an image, weights) as a Blob. */
export async function fetchBlob(path) {
  const response = await fetch(path, { headers: authHeaders() });
  if (!response.ok) throw await failure(response);
  return response.blob();
}

export const listDatasets = () => request("GET", "/v1/datasets").then((r) => r.datasets);
export const listJobs = () => request("GET", "/v1/jobs").then((r) => r.jobs);
export const listModels = () => request("GET", "/v1/models").then((r) => r.models);
export const getJob = (id) => request("GET", `/v1/jobs/${id}`);
export const jobMetrics = (id) => request("GET", `/v1/jobs/${id}/metrics`).then((r) => r.points);
export const createJob = (body) => request("POST", "/v1/jobs", { json: body });
export const cancelJob = (id) => request("POST", `/v1/jobs/${id}/cancel`);
export const readiness = () => request("GET", "/readyz");
export const sampleImage = (datasetId, n) => fetchBlob(`/v1/datasets/${datasetId}/samples/${n}`);
/** One image of a dataset as a PNG thumbnail whose longest side is `size`. */
export const datasetImage = (datasetId, imageId, size) => fetchBlob(`/v1/datasets/${datasetId}/images/${imageId}?size=${size}`);
export const datasetMap = (datasetId, modelId) => request("GET", `/v1/datasets/${datasetId}/map?model_id=${modelId}`);
export const searchSimilar = (datasetId, modelId, imageId, k) =>
  request("POST", `/v1/datasets/${datasetId}/search?model_id=${modelId}&image_id=${imageId}&k=${k}`);
export const selectImages = (datasetId, body) => request("POST", `/v1/datasets/${datasetId}/selections`, { json: body });
/** Sends a label file (CSV with `image_id,label`); resolves to the new label summary. */
export const putLabels = (datasetId, csv) => request("PUT", `/v1/datasets/${datasetId}/labels`, { body: csv, contentType: "text/csv" });

/** Classifies one image (raw body); resolves to its ranked predictions. */
export function classify(modelId, file, topK = 5) {
  return request("POST", `/v1/models/${modelId}/classify?top_k=${topK}`, {
    body: file,
    contentType: file.type || "application/octet-stream",
  }).then((r) => r.predictions[0]);
}

/**
 * Uploads an archive as the raw body. XMLHttpRequest rather than fetch, for
 * upload progress: `onProgress(fraction)`. Resolves to the new dataset.
 */
export function uploadArchive(file, name, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    const query = name ? `?name=${encodeURIComponent(name)}` : `?name=${encodeURIComponent(archiveName(file.name))}`;
    xhr.open("POST", `/v1/datasets${query}`);
    for (const [header, value] of Object.entries(authHeaders({ Accept: "application/json" }))) {
      xhr.setRequestHeader(header, value);
    }
    xhr.setRequestHeader("Content-Type", file.type || "application/octet-stream");
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    });
    xhr.addEventListener("load", () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        // Leave body null: the status says what happened.
      }
      if (xhr.status === 201) resolve(body);
      else reject(new ApiError(xhr.status, body, `${xhr.status} ${xhr.statusText}`));
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, null, "the upload was interrupted")));
    xhr.send(file);
  });
}

/** A dataset name from an archive's file name: without its archive extension. */
function archiveName(fileName) {
  return fileName.replace(/\.(zip|tar|tar\.gz|tgz)$/i, "") || "dataset";
}

/**
 * Follows one job until it ends or `stop()` is called. Reads the job's event
 * stream (`GET /v1/jobs/{id}/events`) with fetch, so the API key can be sent
 * (EventSource cannot set headers); when the stream is unavailable or breaks,
 * polls the job and its metrics every two seconds instead.
 *
 * Handlers: `onJob(job)`, `onMetrics(points)` (may repeat points already
 * delivered; callers key them by name and step), `onMode("live" | "polling")`
 * and `onEnd(job)`. Returns `stop`.
 */
export function followJob(id, { onJob, onMetrics, onMode = () => {}, onEnd = () => {} }) {
  const controller = new AbortController();
  let stopped = false;
  let timer = null;
  let job = null;

  const deliver = (next) => {
    job = next;
    onJob(job);
    if (isTerminal(job.state)) {
      stop();
      onEnd(job);
      return true;
    }
    return false;
  };

  const snapshot = async () => {
    const [next, points] = await Promise.all([getJob(id), jobMetrics(id)]);
    if (stopped) return true;
    onMetrics(points);
    return deliver(next);
  };

  const poll = async () => {
    if (stopped) return;
    try {
      if (await snapshot()) return;
    } catch {
      // A missed poll is retried on the next tick.
    }
    if (!stopped) timer = setTimeout(poll, POLL_INTERVAL_MS);
  };

  const handleEvent = async (name, data) => {
    if (name === "metric") {
      onMetrics([data]);
    } else if (name === "progress") {
      const progress = data.progress ?? data;
      deliver({ ...job, progress: { ...job.progress, ...pick(progress, ["epoch", "epochs", "step", "steps", "checkpoint_step"]) } });
    } else if (name === "state" || name === "end") {
      // The event may carry only the state; the job has the rest (model_id, error).
      if (!deliver(await getJob(id)) && name === "end") await snapshot();
    }
  };

  const stream = async () => {
    // Subscribe first, then read the snapshot: events sent in between wait
    // in the response body, so none is missed.
    const response = await fetch(`/v1/jobs/${id}/events`, {
      headers: authHeaders({ Accept: "text/event-stream" }),
      signal: controller.signal,
    });
    const type = response.headers.get("content-type") ?? "";
    if (!response.ok || !type.startsWith("text/event-stream")) {
      controller.abort();
      throw new Error(`no event stream (${response.status})`);
    }
    if (await snapshot()) return;
    onMode("live");
    for await (const event of readEvents(response.body)) {
      if (stopped) return;
      let data = {};
      try {
        data = event.data ? JSON.parse(event.data) : {};
      } catch {
        continue;
      }
      await handleEvent(event.event, data);
      if (stopped) return;
    }
    throw new Error("the event stream closed");
  };

  const stop = () => {
    stopped = true;
    controller.abort();
    clearTimeout(timer);
  };

  stream().catch(() => {
    if (stopped) return;
    onMode("polling");
    poll();
  });
  return stop;
}

function pick(object, keys) {
  const out = {};
  for (const key of keys) if (Number.isFinite(object?.[key])) out[key] = object[key];
  return out;
}

/** Parses a text/event-stream body into `{event, data}` records. */
async function* readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = "message";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    // A trailing "\r" may be the first half of "\r\n": keep it for the next chunk.
    const lines = buffer.split(/\r\n|\r(?!$)|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "") {
        if (data.length > 0) yield { event, data: data.join("\n") };
        event = "message";
        data = [];
      } else if (line.startsWith(":")) {
        continue;
      } else {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") event = value;
        else if (field === "data") data.push(value);
      }
    }
  }
}
