#!/usr/bin/env python3
"""Label efficiency of the four pretext tasks on Fashion-MNIST.

Drives a running pretext server through its HTTP API only:

1. reads Fashion-MNIST from its IDX files (`PRETEXT_FASHION_MNIST_DIR`,
   default /usr/share/datasets/fashion-mnist);
2. uploads an unlabelled pool (the first N train images), the labelled train
   set and the test set (class folders), and for each budget K a labelled
   subset of K train images per class (seeded; a smaller budget is a subset of
   a larger one);
3. computes, on this machine, the weighted kNN accuracy of the raw pixels
   (as the service computes kNN) on every budget's subset and on the whole
   labelled set, as the baseline of this run;
4. for each pretext task: pretrains an encoder on the pool (recording its
   `images_per_second` metric), then submits an `evaluate` job of protocol
   `label_efficiency` (from scratch and from the encoder by every transfer
   method of `--transfers` at every budget, tested on the test set) and
   `knn` evaluate jobs on every budget's subset and on the whole labelled
   set, and waits for them;
5. after each task rewrites the results: the raw numbers as JSON, Markdown
   tables with the accuracy targets stated as met or missed, and a plot of
   accuracy against labels per class.

Standard library, plus torch for the raw-pixel kNN (required: run the script
with the project's `.venv/bin/python`) and matplotlib for the plot (skipped,
with a message, when it does not import).
"""

import argparse
import datetime
import gzip
import io
import json
import os
import platform
import random
import re
import shlex
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib

DEFAULT_DATASET_DIR = "/usr/share/datasets/fashion-mnist"
DATASET_DIR = os.environ.get("PRETEXT_FASHION_MNIST_DIR") or DEFAULT_DATASET_DIR
DATASET_PACKAGE = "dataset-fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# Label index -> class folder name (Fashion-MNIST's official order).
CLASSES = [
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle_boot",
]
TASKS = ["jigsaw", "rotation", "simclr", "relative_position", "vicreg", "barlow_twins"]
# Pretrain config of each task: the service's defaults for 28 px images
# (resnet10_narrow at 28 px) and the task's documented defaults, written out
# so the results show them. `--pretrain-config` is merged over these,
# `--epochs` over that.
_COMMON_PRETRAIN = {
    "backbone": "resnet10_narrow",
    "image_size": 28,
    "epochs": 10,
    "batch_size": 64,
    "learning_rate": 0.001,
    "weight_decay": 0.0001,
}
DEFAULT_PRETRAIN_BY_TASK = {
    "jigsaw": {
        "pretext": "jigsaw", **_COMMON_PRETRAIN,
        "grid": 3, "num_permutations": 100, "permutation_seed": 1,
        "grayscale_probability": 0.3, "channel_jitter": 0.1,
    },
    "rotation": {"pretext": "rotation", **_COMMON_PRETRAIN},
    "simclr": {
        "pretext": "simclr", **_COMMON_PRETRAIN, "batch_size": 128,
        "temperature": 0.5, "projection_dim": 128, "min_crop_scale": 0.2, "color_jitter": 0.4,
    },
    "relative_position": {
        "pretext": "relative_position", **_COMMON_PRETRAIN,
        "grayscale_probability": 0.3, "channel_jitter": 0.1,
    },
    "vicreg": {
        "pretext": "vicreg", **_COMMON_PRETRAIN, "batch_size": 128,
        "invariance_weight": 25, "variance_weight": 25, "covariance_weight": 1,
        "expander_dim": 2048, "min_crop_scale": 0.2, "color_jitter": 0.4,
    },
    "barlow_twins": {
        "pretext": "barlow_twins", **_COMMON_PRETRAIN, "batch_size": 128,
        "redundancy_weight": 0.0051, "projector_dim": 2048,
        "min_crop_scale": 0.2, "color_jitter": 0.4,
    },
}
# Fine-tuning settings of the label-efficiency jobs; `--finetune-config` is
# merged over them and may only name these fields of an evaluate config.
DEFAULT_FINETUNE = {"epochs": 30, "batch_size": 64, "learning_rate": 0.001}
FINETUNE_FIELDS = (
    "epochs", "min_steps", "batch_size", "learning_rate", "trunk_lr_scale", "weight_decay",
    "seed",
)
# Transfer methods of a label_efficiency evaluation (`config.transfers`);
# `auto` chooses one of fine_tune, linear_probe and knn by cross-validation,
# and self_training's teacher is auto's choice.
TRANSFERS = ["fine_tune", "linear_probe", "knn", "auto", "self_training"]
DEFAULT_TRANSFERS = ",".join(TRANSFERS)
# The service's kNN vote: votes weighted exp(similarity / temperature)
# (`knn_temperature`, default 0.07), queries scored 1024 at a time.
KNN_TEMPERATURE = 0.07
VOTE_CHUNK = 1024
# How long the server may refuse connections (a restart) before the run gives up.
UNREACHABLE_GRACE_SECONDS = 300.0
# Accuracy targets stated as met or missed in the results.
TARGET_BEST_10 = 0.80        # (a) best transfer at 10 labels per class
TARGET_GAIN_POINTS = 3.0     # (b) every task over scratch at 10 per class, in points
TARGET_BEST_100 = 0.87       # (c) best transfer at 100 labels per class
TARGET_KNN_ALL = 0.89        # (d) kNN of the best frozen encoder with all labels
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def log(message):
    print(message, flush=True)


def die(message):
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


# --------------------------------------------------------------------------
# Data


def ensure_dataset():
    """Makes sure the IDX files exist in DATASET_DIR. In the default folder
    the Debian package is installed when we are root; a folder given by
    PRETEXT_FASHION_MNIST_DIR must hold them already."""
    missing = [f for f in FILES.values() if not os.path.isfile(os.path.join(DATASET_DIR, f))]
    if not missing:
        return
    if DATASET_DIR != DEFAULT_DATASET_DIR:
        die(
            f"PRETEXT_FASHION_MNIST_DIR={DATASET_DIR} lacks {', '.join(missing)}; "
            f"put the gzipped IDX files there, or unset it to use {DEFAULT_DATASET_DIR}"
        )
    log(
        f"Fashion-MNIST is missing from {DATASET_DIR} ({', '.join(missing)}); "
        f"`apt-get install {DATASET_PACKAGE}` provides it."
    )
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        install = ["apt-get", "install", "-y", DATASET_PACKAGE]
        log("running: " + shlex.join(install))
        if subprocess.call(install) != 0:
            log("install failed; running apt-get update, then trying again")
            subprocess.call(["apt-get", "update"])
            subprocess.call(install)
    else:
        die(f"run `sudo apt-get install {DATASET_PACKAGE}` (not root, so not trying)")
    missing = [f for f in FILES.values() if not os.path.isfile(os.path.join(DATASET_DIR, f))]
    if missing:
        die(f"still missing after installing {DATASET_PACKAGE}: {', '.join(missing)}")


def read_idx_images(path):
    """A gzipped IDX image file -> (list of row-major pixel bytes, rows, cols)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, count, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != 2051:
        die(f"{path}: not an IDX image file (magic {magic})")
    size = rows * cols
    body = data[16:]
    if len(body) != count * size:
        die(f"{path}: expected {count * size} pixel bytes, found {len(body)}")
    return [body[i * size:(i + 1) * size] for i in range(count)], rows, cols


def read_idx_labels(path):
    """A gzipped IDX label file -> list of class indices."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, count = struct.unpack(">II", data[:8])
    if magic != 2049:
        die(f"{path}: not an IDX label file (magic {magic})")
    labels = list(data[8:])
    if len(labels) != count:
        die(f"{path}: expected {count} labels, found {len(labels)}")
    return labels


def png_chunk(kind, payload):
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def encode_png_gray(pixels, width, height):
    """A grayscale 8-bit PNG: signature, IHDR, one IDAT, IEND."""
    raw = b"".join(b"\x00" + pixels[y * width:(y + 1) * width] for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw, 9))
        + png_chunk(b"IEND", b"")
    )


def build_zip(entries):
    """entries: (archive path, bytes) pairs. PNGs are compressed already."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def class_folder_zip(pngs, labels, indices, prefix):
    """A labelled archive: image i as `<class>/<prefix>_<i>.png`."""
    return build_zip(
        (f"{CLASSES[labels[i]]}/{prefix}_{i:05d}.png", pngs[i]) for i in indices
    )


def labelled_budgets(labels, budgets, seed):
    """For each K, K train indices per class. One seeded shuffle per class,
    so a smaller budget is a subset of a larger one."""
    rng = random.Random(seed)
    by_class = {c: [] for c in range(len(CLASSES))}
    for i, label in enumerate(labels):
        by_class[label].append(i)
    order = {}
    for c in range(len(CLASSES)):
        idx = by_class[c][:]
        rng.shuffle(idx)
        order[c] = idx
    chosen = {}
    for k in budgets:
        for c in range(len(CLASSES)):
            if k > len(order[c]):
                die(f"{k} labels per class asked, class {CLASSES[c]} has {len(order[c])}")
        chosen[k] = {c: order[c][:k] for c in range(len(CLASSES))}
    return chosen


# --------------------------------------------------------------------------
# Raw-pixel kNN, computed here


def import_torch():
    """torch, imported only when needed; a clear error when it is missing."""
    try:
        import torch
    except ImportError as e:
        die(
            f"the raw-pixel kNN baseline needs torch, which does not import with "
            f"{sys.executable} ({e}). Run the script with the project's venv, "
            f"`.venv/bin/python bench/label_efficiency/run.py` (`make setup` installs torch "
            f"there), or `pip install torch`."
        )
    return torch


def pixel_matrix(torch, images):
    """Images (row-major 8-bit pixel bytes, all the same size) -> [N, pixels]
    float tensor in [0, 1]."""
    if not images:
        return torch.zeros((0, 0))
    size = len(images[0])
    flat = torch.frombuffer(bytearray(b"".join(images)), dtype=torch.uint8)
    return flat.view(len(images), size).to(torch.float32) / 255.0


def weighted_knn_predict(torch, train, train_labels, test, num_classes, k, temperature):
    """The service's kNN classifier (`NeighbourBank` in src/ml/transfer.rs):
    train and test rows L2-normalised, cosine similarity, the k most similar
    train rows vote for their class with weight exp(similarity / temperature)
    (shifted by the row's best similarity, which leaves the shares as they
    are), the class with the most weight wins. Returns the predicted classes."""
    def l2_normalise(x):
        return x / x.norm(p=2, dim=1, keepdim=True).clamp_min(1e-12)

    with torch.no_grad():
        bank = l2_normalise(train)
        queries = l2_normalise(test)
        labels = train_labels.to(torch.int64)
        k = max(1, min(k, bank.shape[0]))
        predicted = []
        for start in range(0, queries.shape[0], VOTE_CHUNK):
            similarity = queries[start:start + VOTE_CHUNK] @ bank.T
            top, indices = similarity.topk(k, dim=1, largest=True, sorted=True)
            neighbour_labels = labels[indices]
            weights = ((top - top[:, :1]) / temperature).exp()
            votes = torch.zeros((top.shape[0], num_classes), dtype=torch.float32)
            votes.scatter_add_(1, neighbour_labels, weights)
            predicted.append((votes / votes.sum(dim=1, keepdim=True)).argmax(dim=1))
        return torch.cat(predicted) if predicted else torch.zeros(0, dtype=torch.int64)


def raw_pixel_knn(args, data):
    """Weighted kNN accuracy of the raw pixels (k = --knn-k) with, as the
    train set, each budget's K-per-class subset (the very images uploaded for
    the kNN jobs) and, unless --no-knn-all, all labelled train images; tested
    on the same test images as the jobs. Class indices are those the service
    gives the class folders (sorted names), so even a tied vote resolves as
    it would there."""
    torch = import_torch()
    service_index = {name: i for i, name in enumerate(sorted(CLASSES))}
    to_service = [service_index[name] for name in CLASSES]
    t = time.perf_counter()
    test = pixel_matrix(torch, data["test_images"])
    test_labels = torch.tensor([to_service[c] for c in data["test_labels"]], dtype=torch.int64)
    train_sets = [(str(k), data["budget_indices"][k]) for k in args.budgets]
    if args.knn_all:
        train_sets.append(("all", list(range(args.labelled_limit))))
    result = {
        "computed_by": "this script, on the client machine (not the server)",
        "k": args.knn_k,
        "temperature": KNN_TEMPERATURE,
        "features": "pixels / 255, flattened, L2-normalised; cosine similarity",
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "test_images": int(test.shape[0]),
        "budgets": {},
    }
    for key, indices in train_sets:
        started = time.perf_counter()
        train = pixel_matrix(torch, [data["train_images"][i] for i in indices])
        train_labels = torch.tensor(
            [to_service[data["train_labels"][i]] for i in indices], dtype=torch.int64
        )
        predicted = weighted_knn_predict(
            torch, train, train_labels, test, len(CLASSES), args.knn_k, KNN_TEMPERATURE
        )
        correct = int((predicted == test_labels).sum())
        accuracy = correct / max(1, test.shape[0])
        seconds = time.perf_counter() - started
        result["budgets"][key] = {
            "train_images": len(indices),
            "correct": correct,
            "accuracy": accuracy,
            "wall_seconds": round(seconds, 3),
        }
        per = f"{key} per class" if key != "all" else "all labels"
        log(f"raw-pixel kNN, {per} ({len(indices)} train images): {100 * accuracy:.2f} % "
            f"in {seconds:.1f} s")
    result["wall_seconds"] = round(time.perf_counter() - t, 3)
    return result


# --------------------------------------------------------------------------
# HTTP


class ApiError(Exception):
    """An HTTP error answer, with the problem+json details when there are any."""

    def __init__(self, method, url, status, body, headers=None):
        self.status = status
        self.body = body
        self.headers = headers or {}
        detail = body
        try:
            problem = json.loads(body)
            detail = f"{problem.get('title')}: {problem.get('detail')}"
            errors = [f"{e.get('field')}: {e.get('message')}" for e in problem.get("errors") or []]
            if errors and "; ".join(errors) not in detail:
                detail += " " + "; ".join(errors)
        except (ValueError, AttributeError):
            pass
        super().__init__(f"{method} {url} -> {status}: {detail}")


class Client:
    """JSON over HTTP with the API key; retries 503 answers after Retry-After."""

    def __init__(self, base_url, api_key=None, timeout=600):
        self.base = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def request(self, method, path, body=None, content_type=None, retries_503=30):
        url = self.base + path
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if content_type:
            headers["Content-Type"] = content_type
        unreachable_since = None
        attempt = 0
        while attempt <= retries_503:
            req = urllib.request.Request(url, data=body, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = resp.read()
                    return json.loads(data) if data else None
            except urllib.error.HTTPError as e:
                text = e.read().decode("utf-8", "replace")
                if e.code == 503 and attempt < retries_503:
                    attempt += 1
                    wait = e.headers.get("Retry-After", "1")
                    try:
                        wait = max(1.0, float(wait))
                    except ValueError:
                        wait = 1.0
                    time.sleep(wait)
                    continue
                raise ApiError(method, url, e.code, text, e.headers) from None
            except urllib.error.URLError as e:
                # A restarting server refuses connections for a while; its
                # jobs resume from their checkpoints.
                # Only a refused connection is retried: the request never arrived.
                unreachable_since = unreachable_since or time.monotonic()
                refused = isinstance(e.reason, ConnectionRefusedError)
                if refused and time.monotonic() - unreachable_since < UNREACHABLE_GRACE_SECONDS:
                    time.sleep(2.0)
                    continue
                raise SystemExit(f"error: cannot reach {url}: {e.reason}") from None
        raise SystemExit(f"error: {url} kept answering 503")

    def get(self, path):
        return self.request("GET", path)

    def post_json(self, path, obj):
        return self.request("POST", path, json.dumps(obj).encode(), "application/json")


# --------------------------------------------------------------------------
# Jobs


def parse_time(text):
    """RFC 3339 with any number of fractional digits -> aware datetime."""
    if not text:
        return None
    m = re.match(
        r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|z|[+-]\d\d:?\d\d)$", text
    )
    if not m:
        return None
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    micro = int((m.group(7) or "0")[:6].ljust(6, "0"))
    zone = m.group(8)
    if zone in ("Z", "z"):
        tz = datetime.timezone.utc
    else:
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        tz = datetime.timezone(
            sign * datetime.timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
        )
    return datetime.datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)


def wall_seconds(job):
    """A job's `finished_at - started_at` in seconds, or None."""
    start, end = parse_time(job.get("started_at")), parse_time(job.get("finished_at"))
    if start is None or end is None:
        return None
    return (end - start).total_seconds()


def wait_for_job(client, job_id, what, poll=3.0):
    """Polls job `job_id` until it ends; returns it, or stops the script
    when it did not succeed."""
    while True:
        job = client.get(f"/v1/jobs/{job_id}")
        if job["state"] in ("succeeded", "failed", "cancelled"):
            if job["state"] != "succeeded":
                raise SystemExit(f"{what} job {job_id} ended {job['state']}: {job.get('error')}")
            return job
        time.sleep(poll)


def fmt_metric(value):
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def job_line(label, job):
    """One progress line: state, epoch, step, latest metrics, attempts."""
    p = job.get("progress") or {}
    metrics = job.get("latest_metrics") or {}
    parts = [
        f"[{label}]",
        job.get("state", "?"),
        f"epoch {p.get('epoch', 0)}/{p.get('epochs', 0)}",
        f"step {p.get('step', 0)}/{p.get('steps', 0)}",
    ]
    parts += [f"{k}={fmt_metric(v)}" for k, v in sorted(metrics.items())]
    if job.get("attempts", 0) > 1:
        parts.append(f"attempt {job['attempts']}/{job.get('max_attempts')}")
    return " ".join(parts)


class Job:
    """One job of the benchmark: the request, the server's latest view of the
    job, its evaluation report, and the client-side times."""

    def __init__(self, label, request):
        self.label = label
        self.request = request
        self.id = None
        self.state = "not submitted"
        self.error = None
        self.server = {}
        self.report = None
        self.submitted_at = None
        self.running_since = None
        self.ended_at = None
        self.last_line = None
        # Metric name -> {"mean", "points", "error"} from GET /v1/jobs/{id}/metrics.
        self.series = {}

    @property
    def ended(self):
        return self.ended_at is not None

    @property
    def succeeded(self):
        return self.state == "succeeded"

    def end(self, state, error=None):
        self.state = state
        self.error = error
        self.ended_at = time.monotonic()

    def summary(self, key):
        """A number of the report's summary (e.g. knn_accuracy), or None."""
        return ((self.report or {}).get("summary") or {}).get(key)

    def series_mean(self, name):
        """The mean of the job's recorded values of metric `name`, or None."""
        return (self.series.get(name) or {}).get("mean")

    def record(self):
        """The JSON form: ids, state and error, configs as sent and as
        resolved, times, metrics and report."""
        client_seconds = None
        if self.submitted_at is not None and self.ended_at is not None:
            client_seconds = round(self.ended_at - self.submitted_at, 3)
        return {
            "label": self.label,
            "kind": self.request["kind"],
            "id": self.id,
            "state": self.state,
            "error": self.error,
            "dataset_id": self.request.get("dataset_id"),
            "base_model_id": self.request.get("base_model_id"),
            "model_id": self.server.get("model_id"),
            "device": self.server.get("device"),
            "attempts": self.server.get("attempts"),
            "started_at": self.server.get("started_at"),
            "finished_at": self.server.get("finished_at"),
            "wall_seconds": wall_seconds(self.server),
            "client_seconds": client_seconds,
            "config_sent": self.request.get("config"),
            "config": self.server.get("config"),
            "metrics": self.server.get("latest_metrics") or {},
            "metric_series": self.series,
            "report": self.report,
        }


class Jobs:
    """Submits jobs and waits for them. A refused, failed or timed-out job is
    recorded on its Job; nothing here stops the benchmark."""

    def __init__(self, client, poll_interval, job_timeout):
        self.client = client
        self.poll_interval = poll_interval
        self.job_timeout = job_timeout
        self.submitted = []

    def submit(self, job):
        job.submitted_at = time.monotonic()
        try:
            created = self.client.post_json("/v1/jobs", job.request)
        except ApiError as e:
            job.end("rejected", str(e))
            log(f"[{job.label}] rejected: {e}")
            return job
        job.id, job.server, job.state = created["id"], created, created["state"]
        self.submitted.append(job)
        log(f"[{job.label}] job {job.id} {job.state}")
        return job

    def wait(self, jobs):
        """Polls until every job has ended; a job running longer than the
        timeout is cancelled."""
        pending = [j for j in jobs if not j.ended]
        while pending:
            for job in pending:
                self.poll(job)
            pending = [j for j in pending if not j.ended]
            if pending:
                time.sleep(self.poll_interval)

    def poll(self, job):
        try:
            server = self.client.get(f"/v1/jobs/{job.id}")
        except ApiError as e:
            job.end("unknown", f"could not read the job: {e}")
            return
        job.server, job.state = server, server["state"]
        line = job_line(job.label, server)
        if line != job.last_line:
            log(line)
            job.last_line = line
        if job.state == "running" and job.running_since is None:
            job.running_since = time.monotonic()
        if job.state == "succeeded":
            if job.request["kind"] == "evaluate":
                try:
                    job.report = self.client.get(f"/v1/jobs/{job.id}/report")
                except ApiError as e:
                    job.end("succeeded", f"no report: {e}")
                    return
            job.end("succeeded")
        elif job.state in TERMINAL_STATES:
            job.end(job.state, server.get("error") or job.state)
        elif (
            self.job_timeout is not None
            and job.running_since is not None
            and time.monotonic() - job.running_since > self.job_timeout
        ):
            self.cancel(job)
            job.end("cancelled", f"not finished {self.job_timeout:g} s after it started "
                                 f"running (--job-timeout)")
            log(f"[{job.label}] {job.error}")

    def fetch_series(self, job, name):
        """Reads every recorded value of metric `name` of the job
        (`GET /v1/jobs/{id}/metrics?name=`) and keeps their mean on the job."""
        if not job.id:
            return
        try:
            answer = self.client.get(
                f"/v1/jobs/{job.id}/metrics?name=" + urllib.parse.quote(name)
            )
        except ApiError as e:
            job.series[name] = {"mean": None, "points": 0, "error": str(e)}
            log(f"[{job.label}] could not read metric {name}: {e}")
            return
        values = [p["value"] for p in (answer or {}).get("points") or []
                  if isinstance(p.get("value"), (int, float))]
        job.series[name] = {
            "mean": sum(values) / len(values) if values else None,
            "points": len(values),
            "error": None,
        }

    def cancel(self, job):
        try:
            self.client.request("POST", f"/v1/jobs/{job.id}/cancel")
        except ApiError as e:
            log(f"could not cancel job {job.id}: {e}")

    def cancel_unfinished(self):
        for job in self.submitted:
            if not job.ended:
                self.cancel(job)
                job.end("cancelled", "the benchmark was interrupted")
                log(f"cancelled job {job.id} ({job.label})")


# --------------------------------------------------------------------------
# One pretext task


class TaskRun:
    """A pretext task's jobs (pretrain, label efficiency, kNN per budget and
    on all labels) and the accuracies read from them."""

    def __init__(self, task, transfers):
        self.task = task
        self.transfers = list(transfers)
        self.status = "not started"
        self.note = None
        self.pretrain = None
        self.label_efficiency = None
        self.knn = {}
        self.wall_seconds = None
        # `pretext ceiling` of the resolved pretrain config, measured with
        # the server idle (see measure_ceiling).
        self.ceiling = None

    def jobs(self):
        return [j for j in (self.pretrain, self.label_efficiency, *self.knn.values()) if j]

    def rows(self, plan):
        """One row per budget of the plan: scratch; every transfer method's
        accuracy and gain (`transfers`), the first one's also as
        `pretrained_accuracy` and `gain_points`; auto's choice; the best
        method on the test images; the frozen encoder's kNN."""
        le_rows = ((self.label_efficiency and self.label_efficiency.report) or {}).get("rows") or []
        rows = []
        for i, budget in enumerate(plan):
            row = dict(budget)
            measured = le_rows[i] if i < len(le_rows) else {}
            scratch = measured.get("scratch_accuracy")
            row["labels"] = measured.get("labels")
            row["scratch_accuracy"] = scratch
            row["pretrained_accuracy"] = measured.get("pretrained_accuracy")
            gain = measured.get("gain")
            row["gain_points"] = 100 * gain if gain is not None else None
            methods = {}
            for j, method in enumerate(self.transfers):
                accuracy = measured.get(f"{method}_accuracy")
                if accuracy is None and j == 0:
                    accuracy = measured.get("pretrained_accuracy")
                method_gain = measured.get(f"{method}_gain")
                if method_gain is None and j == 0:
                    method_gain = gain
                if method_gain is None and accuracy is not None and scratch is not None:
                    method_gain = accuracy - scratch
                methods[method] = {
                    "accuracy": accuracy,
                    "gain_points": 100 * method_gain if method_gain is not None else None,
                }
            row["transfers"] = methods
            row["auto_choice"] = measured.get("auto_choice")
            if "self_training" in self.transfers:
                row["self_training"] = {
                    "teacher": measured.get("self_training_teacher"),
                    "pseudo_labels": measured.get("pseudo_labels"),
                    "pseudo_label_agreement": measured.get("pseudo_label_agreement"),
                }
            best = None
            for method, value in methods.items():
                if value["accuracy"] is not None and (
                    best is None or value["accuracy"] > methods[best]["accuracy"]
                ):
                    best = method
            row["best_transfer"] = best
            row["best_accuracy"] = methods[best]["accuracy"] if best else None
            row["best_gain_points"] = methods[best]["gain_points"] if best else None
            if "labels_per_class" in budget:
                knn = self.knn.get(str(budget["labels_per_class"]))
                row["knn_accuracy"] = knn.summary("knn_accuracy") if knn else None
            rows.append(row)
        return rows

    def knn_all_accuracy(self):
        knn = self.knn.get("all")
        return knn.summary("knn_accuracy") if knn else None

    def timing(self):
        """Wall times (the server's `finished_at - started_at`) of the
        pretraining and of the evaluations, and the pretraining throughput
        (mean of the job's `images_per_second` values)."""
        pretrain = self.pretrain
        knn = {key: wall_seconds(job.server) for key, job in self.knn.items()}
        measured = [v for v in knn.values() if v is not None]
        series = (pretrain.series.get("images_per_second") if pretrain else None) or {}
        ceiling = (self.ceiling or {}).get("images_per_second")
        rate = series.get("mean")
        return {
            "pretrain_wall_seconds": wall_seconds(pretrain.server) if pretrain else None,
            "pretrain_images_per_second_mean": rate,
            "pretrain_images_per_second_points": series.get("points"),
            "ceiling_images_per_second": ceiling,
            "ceiling": self.ceiling,
            "ratio_to_ceiling": round(rate / ceiling, 4) if rate and ceiling else None,
            "label_efficiency_wall_seconds": (
                wall_seconds(self.label_efficiency.server) if self.label_efficiency else None
            ),
            "knn_wall_seconds": knn,
            "knn_wall_seconds_total": round(sum(measured), 3) if measured else None,
            "task_wall_seconds": self.wall_seconds,
        }

    def record(self, plan):
        return {
            "task": self.task,
            "status": self.status,
            "note": self.note,
            "wall_seconds": self.wall_seconds,
            "transfers": self.transfers,
            "timing": self.timing(),
            "budgets": self.rows(plan),
            "knn_all_accuracy": self.knn_all_accuracy(),
            "jobs": {
                "pretrain": self.pretrain.record() if self.pretrain else None,
                "label_efficiency": (
                    self.label_efficiency.record() if self.label_efficiency else None
                ),
                "knn": {key: job.record() for key, job in self.knn.items()},
            },
        }


def run_task(run, args, jobs, datasets):
    """Pretrains the task's encoder, then submits its evaluate jobs together
    and waits for them all."""
    started = time.monotonic()
    run.status = "running"
    config = pretrain_config(args, run.task)
    run.pretrain = jobs.submit(Job(
        f"{run.task} pretrain",
        {"kind": "pretrain", "dataset_id": datasets["unlabelled"]["id"], "config": config},
    ))
    jobs.wait([run.pretrain])
    jobs.fetch_series(run.pretrain, "images_per_second")
    if run.pretrain.succeeded:
        # Before the evaluations start, so the ceiling has the machine alone.
        run.ceiling = measure_ceiling(args.ceiling_binary, run.pretrain.server["config"])
        encoder = run.pretrain.server["model_id"]
        test_id = datasets["test"]["id"]
        le_config = {
            "protocol": "label_efficiency",
            "test_dataset_id": test_id,
            "labels_per_class": args.budgets,
            "label_fractions": args.label_fractions,
            "transfers": args.transfers,
            **args.finetune_config,
        }
        if {"knn", "auto"} & set(args.transfers):
            # The kNN transfer votes with the same k as the kNN jobs.
            le_config["k"] = args.knn_k
        run.label_efficiency = Job(f"{run.task} label efficiency", {
            "kind": "evaluate", "dataset_id": datasets["labelled"]["id"],
            "base_model_id": encoder, "config": le_config,
        })
        knn_config = {"protocol": "knn", "test_dataset_id": test_id, "k": args.knn_k}
        knn_sets = [(str(k), datasets["budgets"][str(k)]) for k in args.budgets]
        if args.knn_all:
            knn_sets.append(("all", datasets["labelled"]))
        for key, dataset in knn_sets:
            per = f"K={key}" if key != "all" else "all labels"
            run.knn[key] = Job(f"{run.task} knn {per}", {
                "kind": "evaluate", "dataset_id": dataset["id"],
                "base_model_id": encoder, "config": knn_config,
            })
        evaluations = [run.label_efficiency, *run.knn.values()]
        for job in evaluations:
            jobs.submit(job)
        jobs.wait(evaluations)
    clean = all(j.succeeded and not j.error for j in run.jobs())
    run.status = "succeeded" if clean else "failed"
    if not run.pretrain.succeeded:
        run.note = "pretraining did not succeed, so nothing was evaluated"
    run.wall_seconds = round(time.monotonic() - started, 3)
    log(f"[{run.task}] {run.status} in {run.wall_seconds:.1f} s")


def measure_ceiling(binary, resolved_config):
    """The compute ceiling of a pretrain config on this machine: `pretext
    ceiling` times the same network's forward, backward and optimizer step
    on one synthetic batch in memory. `None` (with a note) without a binary;
    the server must run on this machine for the ratio to mean anything."""
    if not binary:
        return None
    if not os.path.exists(binary):
        log(f"no pretext binary at {binary}: the compute ceiling is not measured")
        return None
    config = {k: v for k, v in resolved_config.items() if v is not None}
    command = [binary, "ceiling", "--config", json.dumps(config), "--image-side", "28",
               "--channels", "1", "--warmup", "3", "--steps", "20"]
    try:
        out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)
        ceiling = json.loads(out.stdout.strip().splitlines()[-1])
        log(f"ceiling of {config.get('pretext')}: {ceiling['images_per_second']:.1f} images/s")
        return ceiling
    except (subprocess.SubprocessError, ValueError, IndexError) as error:
        log(f"the compute ceiling could not be measured: {error}")
        return None


def pretrain_config(args, task):
    """The task's defaults, then --pretrain-config, then --epochs, then the
    task's own --task-config."""
    config = {**DEFAULT_PRETRAIN_BY_TASK[task], **args.pretrain_config}
    if args.epochs is not None:
        config["epochs"] = args.epochs
    config.update(args.task_config.get(task, {}))
    return config


def budget_plan(args):
    """The label-efficiency budgets in the order the service reports them:
    labels per class, then fractions of the labelled set."""
    plan = [{"budget": f"{k} per class", "labels_per_class": k} for k in args.budgets]
    plan += [{"budget": f"{100 * f:g}%", "label_fraction": f} for f in args.label_fractions]
    return plan


# --------------------------------------------------------------------------
# Results


def nproc():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def self_training_note(row):
    """Self-training's teacher, pseudo-label count and their agreement with
    the hidden labels (a description; nothing is chosen by it)."""
    st = row["self_training"]
    agreement = st.get("pseudo_label_agreement")
    return (f"{row['budget']}: {st.get('teacher') or '?'}, {st.get('pseudo_labels') or 0} "
            f"pseudo-labels, {pct(agreement)} correct")


def pct(x):
    return "–" if x is None else f"{100 * x:.2f} %"


def fmt_points(x):
    return "–" if x is None else f"{x:+.2f}"


def fmt_seconds(x):
    return "–" if x is None else f"{x:.1f}"


def at_least(value, threshold):
    """value ≥ threshold, forgiving the last bits of a float difference."""
    return value is not None and value >= threshold - 1e-9


def rows_at(plan, runs, k):
    """Each run's row at the budget of k labels per class, by task, or None
    when k is not a budget of this run."""
    index = next((i for i, b in enumerate(plan) if b.get("labels_per_class") == k), None)
    if index is None:
        return None
    return {run.task: run.rows(plan)[index] for run in runs}


def evaluate_targets(args, state, runs):
    """The accuracy targets, each met or missed with the measured number. A
    target that could not be measured counts as missed. "Best transfer" is
    the listed method with the highest test accuracy; auto's number, chosen
    without the test images, is given beside it."""
    plan = budget_plan(args)
    raw = (state.get("raw_pixel_knn") or {}).get("budgets") or {}
    targets = []

    def target(tid, name, threshold, measured, met, text, details=()):
        targets.append({
            "id": tid, "name": name, "threshold": threshold, "measured": measured,
            "met": bool(met), "measured_text": text, "details": list(details),
        })

    def auto_text(rows):
        if "auto" not in args.transfers:
            return ""
        autos = [(row["transfers"]["auto"]["accuracy"], task, row.get("auto_choice"))
                 for task, row in rows.items() if row["transfers"]["auto"]["accuracy"] is not None]
        if not autos:
            return ""
        accuracy, task, choice = max(autos, key=lambda a: a[0])
        return (f"; auto, chosen without the test images: {pct(accuracy)} "
                f"({task}, picked {choice or '?'})")

    def best_at(tid, k, threshold):
        name = f"{k} labels per class: best transfer ≥ {100 * threshold:g} %"
        rows = rows_at(plan, runs, k)
        if rows is None:
            return target(tid, name, threshold, None, False,
                          f"not measured: {k} is not among --labels-per-class")
        best = [(row["best_accuracy"], task, row["best_transfer"])
                for task, row in rows.items() if row["best_accuracy"] is not None]
        if not best:
            return target(tid, name, threshold, None, False,
                          f"not measured: no transfer accuracy at {k} labels per class")
        accuracy, task, method = max(best, key=lambda b: b[0])
        target(tid, name, threshold, accuracy, at_least(accuracy, threshold),
               f"{pct(accuracy)} ({task}, {method}){auto_text(rows)}")

    best_at("a", 10, TARGET_BEST_10)

    name = (f"10 labels per class: every pretext task, by its best transfer, beats scratch "
            f"by ≥ {TARGET_GAIN_POINTS:g} points and beats raw-pixel kNN")
    rows = rows_at(plan, runs, 10)
    raw10 = (raw.get("10") or {}).get("accuracy")
    if rows is None:
        target("b", name, TARGET_GAIN_POINTS, None, False,
               "not measured: 10 is not among --labels-per-class")
    else:
        details, gains, margins, all_met = [], [], [], True
        for task in TASKS:
            row = rows.get(task)
            if row is None:
                details.append(f"{task}: not run (not in --tasks)")
                all_met = False
                continue
            best, scratch = row["best_accuracy"], row["scratch_accuracy"]
            if best is None or scratch is None:
                details.append(f"{task}: not measured")
                all_met = False
                continue
            gain = row["best_gain_points"]
            margin = 100 * (best - raw10) if raw10 is not None else None
            met = at_least(gain, TARGET_GAIN_POINTS) and margin is not None and margin > 0
            all_met = all_met and met
            gains.append((gain, task))
            if margin is not None:
                margins.append((margin, task))
            auto = row["transfers"].get("auto") or {}
            extra = ""
            if auto.get("accuracy") is not None:
                extra = (f"; auto ({row.get('auto_choice') or '?'}) {pct(auto['accuracy'])}, "
                         f"{fmt_points(auto['gain_points'])}")
            details.append(
                f"{task}: {'met' if met else 'missed'}: {row['best_transfer']} {pct(best)}, "
                f"{fmt_points(gain)} points over scratch ({pct(scratch)}), "
                f"{fmt_points(margin)} points over raw-pixel kNN ({pct(raw10)}){extra}"
            )
        if gains:
            gain, gain_task = min(gains, key=lambda g: g[0])
            text = f"smallest gain over scratch {fmt_points(gain)} points ({gain_task})"
            if margins:
                margin, margin_task = min(margins, key=lambda m: m[0])
                text += (f", smallest margin over raw-pixel kNN ({pct(raw10)}) "
                         f"{fmt_points(margin)} points ({margin_task})")
            else:
                text += ", raw-pixel kNN at 10 per class not measured"
            measured = gain
        else:
            text, measured = "not measured: no task has a transfer and a scratch accuracy", None
        target("b", name, TARGET_GAIN_POINTS, measured, all_met and bool(gains), text, details)

    best_at("c", 100, TARGET_BEST_100)

    name = f"kNN of the best frozen encoder with all labels ≥ {100 * TARGET_KNN_ALL:g} %"
    knn_all = [(run.knn_all_accuracy(), run.task) for run in runs
               if run.knn_all_accuracy() is not None]
    if not args.knn_all:
        target("d", name, TARGET_KNN_ALL, None, False, "not measured: --no-knn-all")
    elif not knn_all:
        target("d", name, TARGET_KNN_ALL, None, False,
               "not measured: no kNN job on all labels succeeded")
    else:
        accuracy, task = max(knn_all, key=lambda a: a[0])
        raw_all = (raw.get("all") or {}).get("accuracy")
        target("d", name, TARGET_KNN_ALL, accuracy, at_least(accuracy, TARGET_KNN_ALL),
               f"{pct(accuracy)} ({task}); raw pixels: {pct(raw_all)}")
    return targets


def write_results(args, state, runs, pyplot, started):
    """(Re)writes <out>/<name>.json, .md and .png from what is measured so far."""
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, args.name)
    plan = budget_plan(args)
    record = {
        **state,
        "devices": sorted({j.server.get("device") for r in runs for j in r.jobs()} - {None}),
        "script_wall_seconds": round(time.monotonic() - started, 3),
        "targets": evaluate_targets(args, state, runs),
        "tasks": [r.record(plan) for r in runs],
    }
    with open(base + ".json", "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    png = write_plot(base + ".png", args, state, runs, plan, pyplot)
    with open(base + ".md", "w") as f:
        f.write(markdown(args, record, runs, plan, png))
    return [base + ".json", base + ".md"] + ([png] if png else [])


def markdown(args, record, runs, plan, png):
    """The report: targets met or missed, how choices were made, accuracy per
    task and transfer method, kNN with the raw-pixel baseline, times,
    failures, run details, configs and jobs."""
    data = record["data"]
    raw = record.get("raw_pixel_knn") or {}
    raw_budgets = raw.get("budgets") or {}
    raw_row = "raw pixels (kNN, this run)"
    lines = [
        "# Label efficiency of the pretext tasks on Fashion-MNIST",
        "",
        f"Every task pretrains an encoder on {data['unlabelled_images']} unlabelled "
        f"Fashion-MNIST train images. An `evaluate` job of protocol `label_efficiency` then "
        f"trains, at every budget, one classifier from scratch and one from the encoder by "
        f"each transfer method of `transfers` ({', '.join(args.transfers)}), with the same "
        f"backbone, input size, labels, seed and settings, on a subset of the "
        f"{data['labelled_images']} labelled train images drawn by the service. `fine_tune` "
        f"trains the whole network, `linear_probe` a linear head on the frozen trunk, `knn` "
        f"classifies by the weighted vote of the {args.knn_k} most similar labelled images "
        f"in the frozen trunk's features, and `auto` takes whichever of the three wins a "
        f"3-fold cross-validation on the budget's labelled images; `self_training` lets "
        f"auto's choice pseudo-label the labelled set's other train images (their labels "
        f"unread), the surest per class, and fine-tunes a student from the encoder on labels "
        f"and pseudo-labels. Gain is a method's "
        f"accuracy minus scratch's, in points. kNN is the weighted {args.knn_k}-nearest-"
        f"neighbour accuracy (cosine similarity, votes weighted exp(similarity / "
        f"{KNN_TEMPERATURE:g})) of the frozen encoder, its neighbours taken among the "
        f"K-per-class subset uploaded by this script (seed {args.seed}), or among all "
        f"labelled train images. The row \"{raw_row}\" is the same kNN on the raw pixels "
        f"(scaled to [0, 1] and flattened), computed by this script in this run with the "
        f"same k on the same subsets. Every accuracy is measured on the same "
        f"{data['test_images']} test images.",
        "",
    ]
    if args.validation:
        lines += [
            f"**Validation run.** Here the \"test images\" are the last {args.validation} "
            f"Fashion-MNIST train images, held out: the unlabelled pool and the labelled set "
            f"are drawn from the train images before them, so no setting chosen on these "
            f"numbers has seen the real test images, which this run does not read.",
            "",
        ]
    lines += [
        "## Targets",
        "",
        "Each target is met or missed; one that could not be measured counts as missed. The "
        "best transfer of a task at a budget is its listed method with the highest test "
        "accuracy, a comparison made after the fact; auto's number, chosen without the test "
        "images, is given beside it.",
        "",
    ]
    for t in record.get("targets") or []:
        lines.append(f"- ({t['id']}) {t['name']}: **{'met' if t['met'] else 'missed'}**, "
                     f"{t['measured_text']}.")
        lines += [f"  - {detail}" for detail in t["details"]]
    lines += [
        "",
        "## How choices were made",
        "",
        "The service's `auto` transfer picks `fine_tune`, `linear_probe` or `knn` at each "
        "budget by 3-fold cross-validation on the labelled training subset of that budget "
        "only; it never sees the test images. Self-training's teacher is that same choice, "
        "and its pseudo-label settings (the service's defaults unless the command line sets "
        "them) were fixed before any run; the share of its pseudo-labels that equal the "
        "hidden train labels is reported as a description and chooses nothing. Nothing in "
        "this run is tuned on the test "
        "images: the pretraining and fine-tuning settings are fixed before the run (the "
        "script's defaults and the command line below, as listed under Configs), kNN uses "
        f"k = {args.knn_k} throughout, and the test images serve only to measure the "
        "accuracies reported here.",
        "",
        "## Accuracy by transfer method",
        "",
    ]
    cols = ["pretext task", "transfer"]
    for b in plan:
        cols += [f"{b['budget']}: accuracy", f"{b['budget']}: gain (points)"]
    has_auto = bool({"auto", "self_training"} & set(args.transfers))
    if has_auto:
        cols.append("auto's choice; self-training's teacher and pseudo-labels")
    numeric = len(cols) - 2 - (1 if has_auto else 0)
    lines += ["| " + " | ".join(cols) + " |",
              "|---|---|" + "---:|" * numeric + ("---|" if has_auto else "")]
    for run in runs:
        rows = run.rows(plan)
        cells = [run.task, "scratch"]
        for row in rows:
            cells += [pct(row["scratch_accuracy"]), ""]
        if has_auto:
            cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
        for method in run.transfers:
            cells = [run.task, method]
            for row in rows:
                value = row["transfers"][method]
                accuracy = pct(value["accuracy"])
                if row["best_transfer"] == method and len(run.transfers) > 1:
                    accuracy = f"**{accuracy}**"
                cells += [accuracy, fmt_points(value["gain_points"])]
            if has_auto:
                choices = [f"{row['budget']}: {row['auto_choice']}" for row in rows
                           if method == "auto" and row.get("auto_choice")]
                if method == "self_training":
                    choices = [self_training_note(row) for row in rows if row.get("self_training")]
                cells.append("; ".join(choices))
            lines.append("| " + " | ".join(cells) + " |")
    cells = [raw_row, f"kNN, k = {raw.get('k', args.knn_k)}"]
    for b in plan:
        key = str(b.get("labels_per_class"))
        value = (raw_budgets.get(key) or {}).get("accuracy") if "labels_per_class" in b else None
        cells += [pct(value), ""]
    if has_auto:
        cells.append("")
    lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Bold: the task's best transfer at that budget (highest test accuracy). Scratch is "
        "trained per task with identical settings; the raw-pixel row has figures only for "
        "the per-class budgets, whose subsets this script draws.",
        "",
        "## kNN of the frozen encoders and of raw pixels",
        "",
    ]
    knn_keys = [str(k) for k in args.budgets] + (["all"] if args.knn_all else [])
    cols = ["features"] + [f"{k} per class: kNN" if k != "all" else "all labels: kNN"
                           for k in knn_keys] + ["wall time (s)"]
    lines += ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    for run in runs:
        cells = [f"{run.task} encoder"]
        cells += [pct(run.knn[k].summary("knn_accuracy")) if k in run.knn else "–"
                  for k in knn_keys]
        cells.append(fmt_seconds(run.timing()["knn_wall_seconds_total"]))
        lines.append("| " + " | ".join(cells) + " |")
    cells = [raw_row] + [pct((raw_budgets.get(k) or {}).get("accuracy")) for k in knn_keys]
    cells.append(fmt_seconds(raw.get("wall_seconds")))
    lines.append("| " + " | ".join(cells) + " |")
    raw_times = ", ".join(
        f"{k + ' per class' if k != 'all' else 'all labels'} "
        f"({v['train_images']} train images) {v['wall_seconds']:.2f} s"
        for k, v in raw_budgets.items()
    )
    lines += [
        "",
        "Wall time: for an encoder the sum of its kNN jobs' `finished_at - started_at` "
        "(feature extraction included), for raw pixels the time this script took on the "
        f"client machine (torch {raw.get('torch_version', '?')}, "
        f"{raw.get('torch_threads', '?')} threads): {raw_times or 'nothing computed'}.",
        "",
        "## Time",
        "",
        "Wall times are the jobs' `finished_at - started_at`. Pretraining images/s is the mean "
        "of the `images_per_second` values the pretrain job recorded "
        "(`GET /v1/jobs/{id}/metrics?name=images_per_second`). A task's evaluate jobs are "
        "submitted together, so with several workers their times overlap.",
        "",
        "The ceiling is `pretext ceiling` on the job's resolved config: the same network's "
        "forward pass, backward pass and optimizer step on one synthetic batch already in "
        "memory, timed in-process on this machine right after the pretraining, before the "
        "evaluations start; the ratio is the job's images/s over it.",
        "",
        "| task | pretraining (s) | pretraining images/s | ceiling images/s | ratio | "
        "label-efficiency evaluation, fine-tuning included (s) | kNN evaluations (s, sum) | "
        "task, client-side (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        timing = run.timing()
        rate = timing["pretrain_images_per_second_mean"]
        rate_text = "–" if rate is None else (
            f"{rate:.1f} (mean of {timing['pretrain_images_per_second_points']})"
        )
        ceiling = timing["ceiling_images_per_second"]
        ratio = timing["ratio_to_ceiling"]
        lines.append(
            f"| {run.task} | {fmt_seconds(timing['pretrain_wall_seconds'])} | {rate_text} | "
            f"{'–' if ceiling is None else f'{ceiling:.1f}'} | "
            f"{'–' if ratio is None else f'{ratio:.2f}'} | "
            f"{fmt_seconds(timing['label_efficiency_wall_seconds'])} | "
            f"{fmt_seconds(timing['knn_wall_seconds_total'])} | "
            f"{fmt_seconds(timing['task_wall_seconds'])} |"
        )
    lines.append("")
    problems = [job for run in runs for job in run.jobs() if not job.succeeded or job.error]
    not_run = [run for run in runs if run.status == "not started" or run.note]
    if problems or not_run:
        lines += ["Not measured:", ""]
        lines += [f"- {run.task}: {run.note or run.status}" for run in not_run]
        lines += [f"- {job.label}: {job.state}: {job.error}" for job in problems]
        lines.append("")
    if png:
        lines += [f"![accuracy against labels per class]({os.path.basename(png)})", ""]
    server = record["server"]
    devices = ", ".join(record["devices"]) or "none reported by the jobs"
    min_steps = record.get("min_steps")
    if min_steps is None:
        min_steps = "the service's default (the resolved configs below give it)"
    lines += [
        "## Run",
        "",
        f"- Command: `{record['command']}`",
        f"- Date: {record['date']}",
        f"- Status: {record['status']}",
        f"- Client machine: `uname -m` = {record['machine']}, nproc = {record['nproc']}",
        f"- Server: {server['url']}, {server['workers']} training worker(s); "
        f"devices of its jobs (`GET /v1/jobs/{{id}}`): {devices}",
        f"- Transfer methods: {', '.join(args.transfers)}; min_steps: {min_steps}",
        f"- Raw-pixel kNN: computed by this script on the client in "
        f"{fmt_seconds(raw.get('wall_seconds'))} s",
    ]
    if args.device_note:
        lines.append(f"- Device note: {args.device_note}")
    if args.deadline_seconds is not None:
        lines.append(f"- Deadline: no task started after {args.deadline_seconds:g} s")
    lines += [
        f"- Total wall time of the script: {record['script_wall_seconds']:.1f} s",
        "",
        "## Configs",
        "",
        "Pretrain jobs, as sent, then as resolved by the server:",
        "",
        "```json",
    ]
    for run in runs:
        if run.pretrain:
            lines.append(json.dumps(run.pretrain.request["config"]))
            if run.pretrain.server.get("config"):
                lines.append(json.dumps(run.pretrain.server["config"]))
    lines += ["```", ""]
    evaluated = next((run for run in runs if run.label_efficiency), None)
    if evaluated:
        lines += [
            f"Evaluate jobs of {evaluated.task} (those of the other tasks differ only in "
            f"`base_model_id`): label efficiency as sent and as resolved, then kNN as sent:",
            "",
            "```json",
            json.dumps(evaluated.label_efficiency.request["config"]),
        ]
        if evaluated.label_efficiency.server.get("config"):
            lines.append(json.dumps(evaluated.label_efficiency.server["config"]))
        lines += [json.dumps(job.request["config"]) for job in list(evaluated.knn.values())[:1]]
        lines += ["```", ""]
    lines += [
        "## Jobs",
        "",
        "Wall time is the job's `finished_at - started_at`.",
        "",
        "| job | state | job id | device | wall time (s) | result |",
        "|---|---|---|---|---:|---|",
    ]
    for run in runs:
        for job in run.jobs():
            wall = wall_seconds(job.server)
            summary = (job.report or {}).get("summary") or {}
            if job.request["kind"] == "pretrain":
                summary = {k: v for k, v in (job.server.get("latest_metrics") or {}).items()
                           if k in ("pretext_accuracy", "pretext_loss", "chance_accuracy")}
                rate = job.series_mean("images_per_second")
                if rate is not None:
                    summary["mean_images_per_second"] = rate
            result = ", ".join(f"{k}={fmt_metric(v)}" for k, v in sorted(summary.items()))
            if job.error:
                result = (result + "; " if result else "") + job.error.replace("|", "\\|")
            lines.append(
                f"| {job.label} | {job.state} | `{job.id or '–'}` | "
                f"{job.server.get('device') or '–'} | "
                f"{f'{wall:.1f}' if wall is not None else '–'} | {result} |"
            )
    lines.append("")
    return "\n".join(lines)


def load_pyplot():
    """matplotlib's pyplot on the Agg backend, or None with a message."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError as e:
        log(f"matplotlib does not import ({e}); the plot will be skipped. "
            f"`make bench-setup` installs it into .venv (run the script with .venv/bin/python), "
            f"or `pip install matplotlib`.")
        return None
    return pyplot


def write_plot(path, args, state, runs, plan, pyplot):
    """Test accuracy against labels per class (log x): one solid line per
    task from its encoder (by `auto` when it is listed, else by the first
    transfer method), one dashed line from scratch (the mean of the tasks'
    scratch runs) and a dotted line of the raw-pixel kNN. Returns the path,
    or None when nothing was drawn."""
    if pyplot is None:
        return None
    method = "auto" if "auto" in args.transfers else args.transfers[0]
    lines, scratch = [], {}
    for run in runs:
        measured = []
        for row in run.rows(plan):
            accuracy = row["transfers"][method]["accuracy"]
            if row["labels"] is None or accuracy is None:
                continue
            x = row["labels"] / len(CLASSES)
            measured.append((x, 100 * accuracy))
            if row["scratch_accuracy"] is not None:
                scratch.setdefault(x, []).append(100 * row["scratch_accuracy"])
        if measured:
            lines.append((run.task, sorted(measured)))
    if not lines:
        return None
    fig, ax = pyplot.subplots(figsize=(7, 4.5))
    for task, task_points in lines:
        ax.plot([p[0] for p in task_points], [p[1] for p in task_points], "-o",
                label=f"{task} ({method})")
    xs = sorted(scratch)
    if xs:
        ax.plot(xs, [sum(scratch[x]) / len(scratch[x]) for x in xs], "--s", color="black",
                label="from scratch" + (" (mean of the tasks' runs)" if len(lines) > 1 else ""))
    raw = (state.get("raw_pixel_knn") or {}).get("budgets") or {}
    raw_points = sorted((k, 100 * raw[str(k)]["accuracy"]) for k in args.budgets
                        if str(k) in raw)
    if raw_points:
        ax.plot([p[0] for p in raw_points], [p[1] for p in raw_points], ":^", color="grey",
                label="raw pixels (kNN, this run)")
    ticks = []
    for x in sorted(set(xs) | {p[0] for _, pts in lines for p in pts}):
        if not ticks or x > 1.25 * ticks[-1]:
            ticks.append(x)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(pyplot.FixedLocator(ticks))
    ax.xaxis.set_minor_locator(pyplot.NullLocator())
    ax.set_xticklabels([f"{x:.3g}" for x in ticks])
    ax.set_xlabel("labels per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Fashion-MNIST: each pretext task's encoder ({method})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    pyplot.close(fig)
    return path


# --------------------------------------------------------------------------
# Command line


def parse_list(ap, text, kind, option):
    try:
        return sorted({kind(x) for x in text.split(",") if x.strip()})
    except ValueError:
        ap.error(f"{option} takes a comma-separated list of {kind.__name__}s")


def parse_args():
    ap = argparse.ArgumentParser(
        description="Measure how many labels each pretext task saves on Fashion-MNIST."
    )
    ap.add_argument("--url", default=os.environ.get("PRETEXT_URL") or "http://127.0.0.1:8080",
                    help="pretext server URL (default $PRETEXT_URL, else http://127.0.0.1:8080)")
    ap.add_argument("--api-key", default=os.environ.get("PRETEXT_API_KEY"),
                    help="API key (default: $PRETEXT_API_KEY)")
    ap.add_argument("--tasks", default=",".join(TASKS),
                    help="comma-separated pretext tasks, run in this order "
                         f"(default {','.join(TASKS)})")
    ap.add_argument("--unlabelled", type=int, default=20000,
                    help="first N train images form the unlabelled pool (default 20000)")
    ap.add_argument("--labelled-limit", type=int, default=60000,
                    help="first N train images form the labelled train set (default all 60000)")
    ap.add_argument("--labels-per-class", default="10,100",
                    help="comma-separated label budgets K per class (default 10,100)")
    ap.add_argument("--label-fractions", default="",
                    help="comma-separated fractions of the labelled set, also fine-tuned by "
                         "the label-efficiency job (default none)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the uploaded K-per-class subsets and of the label-efficiency "
                         "jobs unless --finetune-config sets one (default 0)")
    ap.add_argument("--pretrain-config", default="{}",
                    help="JSON merged over every task's default pretrain config")
    ap.add_argument("--epochs", type=int, default=None,
                    help="pretraining epochs of every task (overrides the configs)")
    ap.add_argument("--task-config", action="append", default=[], metavar="TASK=JSON",
                    help="JSON merged over one task's pretrain config last, e.g. "
                         "'simclr={\"epochs\": 35}'; repeat for other tasks")
    ap.add_argument("--finetune-config", default="{}",
                    help=f"JSON merged over the label-efficiency settings "
                         f"{json.dumps(DEFAULT_FINETUNE)}; fields: {', '.join(FINETUNE_FIELDS)}")
    ap.add_argument("--transfers", default=DEFAULT_TRANSFERS,
                    help="comma-separated transfer methods of the label-efficiency jobs, "
                         f"some of {', '.join(TRANSFERS)}; the first gives "
                         f"pretrained_accuracy and gain (default {DEFAULT_TRANSFERS})")
    ap.add_argument("--min-steps", type=int, default=None,
                    help="fewest optimizer steps of each fine-tuning run of the "
                         "label-efficiency jobs (config min_steps; default: the service's, 1500)")
    ap.add_argument("--knn-k", type=int, default=20,
                    help="neighbours of the kNN jobs, of the kNN transfer and of the raw-pixel "
                         "kNN (default 20)")
    ap.add_argument("--no-knn-all", dest="knn_all", action="store_false",
                    help="skip the kNN job and the raw-pixel kNN on the whole labelled train "
                         "set")
    ap.add_argument("--test-limit", type=int, default=None,
                    help="use only the first N test images (default all 10000)")
    ap.add_argument("--validation", type=int, default=None, metavar="N",
                    help="a validation run, for choosing settings: the last N train images "
                         "take the test images' place (they are never pretrained on nor "
                         "labelled for training), the labelled set and its budgets are drawn "
                         "from the train images before them, and the test images are not read")
    ap.add_argument("--deadline-seconds", type=float, default=None,
                    help="start no new task after this many seconds of wall time")
    ap.add_argument("--job-timeout", type=float, default=None,
                    help="cancel a job still unfinished this many seconds after it started "
                         "running (default none)")
    ap.add_argument("--device-note", default=None,
                    help="a note on the server's hardware for the report (e.g. the GPU model)")
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results"),
                    help="output folder (default bench/results in the repository)")
    ap.add_argument("--name", default="label_efficiency",
                    help="file name of the results, without extension (default label_efficiency)")
    ap.add_argument("--poll-interval", type=float, default=5.0, help="seconds between polls")
    ap.add_argument("--ceiling-binary",
                    default=os.path.join(REPO_ROOT, "target", "release", "pretext"),
                    help="the pretext binary whose `ceiling` command measures each task's compute "
                         "ceiling on this machine ('' to skip; default target/release/pretext)")
    args = ap.parse_args()

    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown or not args.tasks:
        ap.error(f"--tasks takes some of {', '.join(TASKS)} (got {', '.join(unknown) or 'none'})")
    args.tasks = list(dict.fromkeys(args.tasks))
    args.budgets = parse_list(ap, args.labels_per_class, int, "--labels-per-class")
    if not args.budgets or min(args.budgets) < 1:
        ap.error("--labels-per-class needs at least one positive integer")
    args.label_fractions = parse_list(ap, args.label_fractions, float, "--label-fractions")
    if any(not 0 < f <= 1 for f in args.label_fractions):
        ap.error("--label-fractions must lie in (0, 1]")
    for name in ("pretrain_config", "finetune_config"):
        option = "--" + name.replace("_", "-")
        try:
            value = json.loads(getattr(args, name))
        except ValueError as e:
            ap.error(f"{option} is not valid JSON: {e}")
        if not isinstance(value, dict):
            ap.error(f"{option} must be a JSON object")
        setattr(args, name, value)
    if "pretext" in args.pretrain_config:
        ap.error("--pretrain-config must not set pretext; choose the tasks with --tasks")
    by_task = {}
    for item in args.task_config:
        task, sep, text = item.partition("=")
        if not sep or task not in TASKS:
            ap.error(f"--task-config takes TASK=JSON with TASK one of {', '.join(TASKS)} "
                     f"(got {item!r})")
        try:
            value = json.loads(text)
        except ValueError as e:
            ap.error(f"--task-config {task}: not valid JSON: {e}")
        if not isinstance(value, dict) or "pretext" in value:
            ap.error(f"--task-config {task}: give a JSON object without pretext")
        by_task.setdefault(task, {}).update(value)
    args.task_config = by_task
    extra = sorted(set(args.finetune_config) - set(FINETUNE_FIELDS))
    if extra:
        ap.error(f"--finetune-config: unknown field(s) {', '.join(extra)}; "
                 f"use {', '.join(FINETUNE_FIELDS)}")
    args.finetune_config = {"seed": args.seed, **DEFAULT_FINETUNE, **args.finetune_config}
    if args.min_steps is not None:
        if args.min_steps < 0:
            ap.error("--min-steps must be 0 or more")
        args.finetune_config["min_steps"] = args.min_steps
    transfers = [t.strip() for t in args.transfers.split(",") if t.strip()]
    unknown = [t for t in transfers if t not in TRANSFERS]
    if unknown or not transfers:
        ap.error(f"--transfers takes some of {', '.join(TRANSFERS)} "
                 f"(got {', '.join(unknown) or 'none'})")
    args.transfers = list(dict.fromkeys(transfers))
    if args.knn_k < 1:
        ap.error("--knn-k must be positive")
    if args.epochs is not None and args.epochs < 1:
        ap.error("--epochs must be positive")
    if not 1 <= args.unlabelled <= 60000:
        ap.error("--unlabelled must be between 1 and 60000")
    if not 1 <= args.labelled_limit <= 60000:
        ap.error("--labelled-limit must be between 1 and 60000")
    if args.test_limit is not None and not 1 <= args.test_limit <= 10000:
        ap.error("--test-limit must be between 1 and 10000")
    if args.validation is not None:
        if not 1 <= args.validation <= 30000:
            ap.error("--validation must be between 1 and 30000")
        if args.test_limit is not None:
            ap.error("--validation replaces the test images; leave out --test-limit")
        held_out = 60000 - args.validation
        if args.unlabelled > held_out:
            ap.error(f"--unlabelled must be at most {held_out} with --validation "
                     f"{args.validation}: the pool may not hold validation images")
        args.labelled_limit = min(args.labelled_limit, held_out)
    return args


def redacted_command():
    """The command line, with the API key's value hidden."""
    argv, hide = [], False
    for arg in sys.argv:
        if hide:
            argv.append("…")
            hide = False
        elif arg == "--api-key":
            argv.append(arg)
            hide = True
        elif arg.startswith("--api-key="):
            argv.append("--api-key=…")
        else:
            argv.append(arg)
    return shlex.join(["python3"] + argv)


# --------------------------------------------------------------------------
# Main


def load_data(args):
    """Reads Fashion-MNIST: the train images the pool and the labelled set
    need, the test images, their labels, and the train indices of each
    K-per-class budget (drawn with --seed)."""
    ensure_dataset()
    t = time.time()
    train_images, rows, cols = read_idx_images(os.path.join(DATASET_DIR, FILES["train_images"]))
    train_labels = read_idx_labels(os.path.join(DATASET_DIR, FILES["train_labels"]))
    if args.validation:
        test_images = train_images[len(train_images) - args.validation:]
        test_labels = train_labels[len(train_labels) - args.validation:]
    else:
        test_images, _, _ = read_idx_images(os.path.join(DATASET_DIR, FILES["test_images"]))
        test_labels = read_idx_labels(os.path.join(DATASET_DIR, FILES["test_labels"]))
    if args.test_limit:
        test_images, test_labels = test_images[:args.test_limit], test_labels[:args.test_limit]
    n_train = max(args.unlabelled, args.labelled_limit)
    train_pngs = [encode_png_gray(img, cols, rows) for img in train_images[:n_train]]
    test_pngs = [encode_png_gray(img, cols, rows) for img in test_images]
    labelled_labels = train_labels[:args.labelled_limit]
    chosen = labelled_budgets(labelled_labels, args.budgets, args.seed)
    log(f"read and encoded Fashion-MNIST ({cols}x{rows}): {n_train} train, "
        f"{len(test_pngs)} test images in {time.time() - t:.1f} s")
    return {
        "train_images": train_images[:n_train],
        "train_labels": train_labels[:n_train],
        "train_pngs": train_pngs,
        "test_images": test_images,
        "test_labels": test_labels,
        "test_pngs": test_pngs,
        "budget_indices": {
            k: sorted(i for c in range(len(CLASSES)) for i in chosen[k][c]) for k in args.budgets
        },
    }


def upload_datasets(client, args, data):
    """Uploads the unlabelled pool, the labelled train set, the test set and
    the K-per-class subsets; returns them by role."""
    train_pngs, train_labels = data["train_pngs"], data["train_labels"]
    test_pngs, test_labels = data["test_pngs"], data["test_labels"]
    labelled_labels = train_labels[:args.labelled_limit]
    tag = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")

    def upload(name, archive, images, classes=None):
        t = time.time()
        try:
            ds = client.request(
                "POST", "/v1/datasets?name=" + urllib.parse.quote(name), archive,
                "application/zip",
            )
        except ApiError as e:
            die(str(e))
        log(f"uploaded {name}: id {ds['id']}, {ds['num_images']} images, "
            f"{len(ds.get('classes') or [])} classes, skipped={ds['skipped_count']} "
            f"({len(archive) / 1e6:.1f} MB, {time.time() - t:.1f} s)")
        if ds["num_images"] != images or (classes is not None and set(ds["classes"]) != classes):
            die(f"dataset {name} came back with {ds['num_images']} images and classes "
                f"{ds.get('classes')}; expected {images} images, classes {sorted(classes or [])}")
        return {"id": ds["id"], "name": name, "images": ds["num_images"]}

    datasets = {
        "unlabelled": upload(
            f"fmnist-unlabelled-{args.unlabelled}-{tag}",
            build_zip((f"img_{i:05d}.png", train_pngs[i]) for i in range(args.unlabelled)),
            args.unlabelled,
        ),
        "labelled": upload(
            f"fmnist-labelled-{args.labelled_limit}-{tag}",
            class_folder_zip(train_pngs, train_labels, range(args.labelled_limit), "train"),
            args.labelled_limit, {CLASSES[c] for c in labelled_labels},
        ),
        "test": upload(
            f"fmnist-test-{len(test_pngs)}-{tag}",
            class_folder_zip(test_pngs, test_labels, range(len(test_pngs)), "test"),
            len(test_pngs), {CLASSES[c] for c in test_labels},
        ),
        "budgets": {},
    }
    for k in args.budgets:
        indices = data["budget_indices"][k]
        datasets["budgets"][str(k)] = upload(
            f"fmnist-{k}-per-class-seed{args.seed}-{tag}",
            class_folder_zip(train_pngs, train_labels, indices, "train"),
            len(indices), set(CLASSES),
        )
    return datasets


def main():
    args = parse_args()
    import_torch()  # fail before any upload when the raw-pixel kNN cannot run
    started = time.monotonic()
    client = Client(args.url, args.api_key)
    try:
        ready = client.get("/readyz")
    except ApiError as e:
        die(f"server not ready: {e}")
    log(f"server {args.url}: {ready.get('status')}, {ready.get('workers')} training worker(s)")
    if not ready.get("workers"):
        log("warning: the server runs no training workers; jobs will stay queued")
    pyplot = load_pyplot()

    data = load_data(args)
    datasets = upload_datasets(client, args, data)
    raw_pixels = raw_pixel_knn(args, data)
    del data
    state = {
        "benchmark": "label_efficiency",
        "command": redacted_command(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "status": "running",
        "machine": platform.machine(),
        "nproc": nproc(),
        "server": {"url": args.url, "workers": ready.get("workers")},
        "device_note": args.device_note,
        "validation_images": args.validation,
        "deadline_seconds": args.deadline_seconds,
        "job_timeout_seconds": args.job_timeout,
        "seed": args.seed,
        "knn_k": args.knn_k,
        "data": {
            "dir": DATASET_DIR,
            "unlabelled_images": datasets["unlabelled"]["images"],
            "labelled_images": datasets["labelled"]["images"],
            "test_images": datasets["test"]["images"],
        },
        "datasets": datasets,
        "pretrain_config_override": args.pretrain_config,
        "epochs_override": args.epochs,
        "finetune_config": args.finetune_config,
        "transfers": args.transfers,
        "min_steps": args.finetune_config.get("min_steps"),
        "raw_pixel_knn": raw_pixels,
    }
    runs = [TaskRun(task, args.transfers) for task in args.tasks]
    jobs = Jobs(client, args.poll_interval, args.job_timeout)

    def save():
        return write_results(args, state, runs, pyplot, started)

    try:
        for run in runs:
            elapsed = time.monotonic() - started
            if args.deadline_seconds is not None and elapsed >= args.deadline_seconds:
                run.status = "skipped"
                run.note = (f"not started: {elapsed:.0f} s had passed, past the deadline of "
                            f"{args.deadline_seconds:g} s")
                log(f"[{run.task}] {run.note}")
                continue
            run_task(run, args, jobs, datasets)
            paths = save()
            log(f"wrote {', '.join(paths)}")
    except KeyboardInterrupt:
        jobs.cancel_unfinished()
        state["status"] = "interrupted"
        save()
        raise SystemExit(130) from None
    state["status"] = "finished" if all(r.pretrain for r in runs) else "stopped by the deadline"
    paths = save()

    log("")
    for line in console_summary(args, state, runs):
        log(line)
    log(f"wrote {', '.join(paths)}")


def console_summary(args, state, runs):
    """The headline numbers for the terminal: per task and transfer method
    the accuracy and gain at every budget, the kNN accuracies, the targets."""
    plan = budget_plan(args)
    lines = ["  |  ".join(["task", "transfer"] + [
        f"{b['budget']}: accuracy (gain)" for b in plan
    ])]
    for run in runs:
        rows = run.rows(plan)
        lines.append("  |  ".join(
            [run.task, "scratch"] + [pct(row["scratch_accuracy"]) for row in rows]
        ))
        for method in run.transfers:
            cells = [run.task, method]
            for row in rows:
                value = row["transfers"][method]
                cell = f"{pct(value['accuracy'])} ({fmt_points(value['gain_points'])})"
                if method == "auto" and row.get("auto_choice"):
                    cell += f" [{row['auto_choice']}]"
                cells.append(cell)
            lines.append("  |  ".join(cells))
    knn_keys = [str(k) for k in args.budgets] + (["all"] if args.knn_all else [])
    lines.append("kNN  |  " + "  |  ".join(
        f"{k} per class" if k != "all" else "all labels" for k in knn_keys
    ))
    for run in runs:
        lines.append(f"{run.task}  |  " + "  |  ".join(
            pct(run.knn[k].summary("knn_accuracy")) if k in run.knn else "–" for k in knn_keys
        ))
    raw = (state.get("raw_pixel_knn") or {}).get("budgets") or {}
    lines.append("raw pixels (kNN, this run)  |  " + "  |  ".join(
        pct((raw.get(k) or {}).get("accuracy")) for k in knn_keys
    ))
    for target in evaluate_targets(args, state, runs):
        lines.append(f"target {target['id']}: {'met' if target['met'] else 'missed'}: "
                     f"{target['name']}: {target['measured_text']}")
    return lines


if __name__ == "__main__":
    main()
