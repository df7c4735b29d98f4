#!/usr/bin/env python3
"""Label efficiency of the four pretext tasks on Fashion-MNIST.

Drives a running pretext server through its HTTP API only:

1. reads Fashion-MNIST from its IDX files (`PRETEXT_FASHION_MNIST_DIR`,
   default /usr/share/datasets/fashion-mnist);
2. uploads an unlabelled pool (the first N train images), the labelled train
   set and the test set (class folders), and for each budget K a labelled
   subset of K train images per class (seeded; a smaller budget is a subset of
   a larger one);
3. for each pretext task: pretrains an encoder on the pool, then submits an
   `evaluate` job of protocol `label_efficiency` (fine-tuning from the encoder
   and from scratch at every budget, tested on the test set) and `knn`
   evaluate jobs on every budget's subset and on the whole labelled set, and
   waits for them;
4. after each task rewrites the results: the raw numbers as JSON, a Markdown
   table and a plot of accuracy against labels per class.

Standard library only, apart from matplotlib for the plot (skipped, with a
message, when it does not import).
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
TASKS = ["jigsaw", "rotation", "simclr", "relative_position"]
# Pretrain config of each task: ResNet-18 small at 32 px (Fashion-MNIST is
# 28x28) and the task's documented defaults, written out so the results show
# them. `--pretrain-config` is merged over these, `--epochs` over that.
_COMMON_PRETRAIN = {
    "backbone": "resnet18_small",
    "image_size": 32,
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
}
# Fine-tuning settings of the label-efficiency jobs; `--finetune-config` is
# merged over them and may only name these fields of an evaluate config.
DEFAULT_FINETUNE = {"epochs": 30, "batch_size": 64, "learning_rate": 0.001}
FINETUNE_FIELDS = (
    "epochs", "batch_size", "learning_rate", "trunk_lr_scale", "weight_decay", "seed",
)
# kNN accuracy of raw pixels on Fashion-MNIST, quoted as given (not measured here).
RAW_PIXEL_KNN_REFERENCE = {"10": 0.673, "100": 0.764, "all": 0.861}
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
        for attempt in range(retries_503 + 1):
            req = urllib.request.Request(url, data=body, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = resp.read()
                    return json.loads(data) if data else None
            except urllib.error.HTTPError as e:
                text = e.read().decode("utf-8", "replace")
                if e.code == 503 and attempt < retries_503:
                    wait = e.headers.get("Retry-After", "1")
                    try:
                        wait = max(1.0, float(wait))
                    except ValueError:
                        wait = 1.0
                    time.sleep(wait)
                    continue
                raise ApiError(method, url, e.code, text, e.headers) from None
            except urllib.error.URLError as e:
                raise SystemExit(f"error: cannot reach {url}: {e.reason}") from None
        raise AssertionError("unreachable")

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

    def __init__(self, task):
        self.task = task
        self.status = "not started"
        self.note = None
        self.pretrain = None
        self.label_efficiency = None
        self.knn = {}
        self.wall_seconds = None

    def jobs(self):
        return [j for j in (self.pretrain, self.label_efficiency, *self.knn.values()) if j]

    def rows(self, plan):
        """One row per budget of the plan: scratch, pretrained, gain, kNN."""
        le_rows = ((self.label_efficiency and self.label_efficiency.report) or {}).get("rows") or []
        rows = []
        for i, budget in enumerate(plan):
            row = dict(budget)
            measured = le_rows[i] if i < len(le_rows) else {}
            row["labels"] = measured.get("labels")
            row["scratch_accuracy"] = measured.get("scratch_accuracy")
            row["pretrained_accuracy"] = measured.get("pretrained_accuracy")
            gain = measured.get("gain")
            row["gain_points"] = 100 * gain if gain is not None else None
            if "labels_per_class" in budget:
                knn = self.knn.get(str(budget["labels_per_class"]))
                row["knn_accuracy"] = knn.summary("knn_accuracy") if knn else None
            rows.append(row)
        return rows

    def knn_all_accuracy(self):
        knn = self.knn.get("all")
        return knn.summary("knn_accuracy") if knn else None

    def record(self, plan):
        return {
            "task": self.task,
            "status": self.status,
            "note": self.note,
            "wall_seconds": self.wall_seconds,
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
    if run.pretrain.succeeded:
        encoder = run.pretrain.server["model_id"]
        test_id = datasets["test"]["id"]
        le_config = {
            "protocol": "label_efficiency",
            "test_dataset_id": test_id,
            "labels_per_class": args.budgets,
            "label_fractions": args.label_fractions,
            **args.finetune_config,
        }
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


def pct(x):
    return "–" if x is None else f"{100 * x:.2f} %"


def fmt_points(x):
    return "–" if x is None else f"{x:+.2f}"


def write_results(args, state, runs, pyplot, started):
    """(Re)writes <out>/<name>.json, .md and .png from what is measured so far."""
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, args.name)
    plan = budget_plan(args)
    record = {
        **state,
        "devices": sorted({j.server.get("device") for r in runs for j in r.jobs()} - {None}),
        "script_wall_seconds": round(time.monotonic() - started, 3),
        "tasks": [r.record(plan) for r in runs],
    }
    with open(base + ".json", "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    png = write_plot(base + ".png", args, runs, plan, pyplot)
    with open(base + ".md", "w") as f:
        f.write(markdown(args, record, runs, plan, png))
    return [base + ".json", base + ".md"] + ([png] if png else [])


def markdown(args, record, runs, plan, png):
    """The report: accuracy table, reference figures, failures, run details,
    configs and jobs."""
    data = record["data"]
    cols = ["pretext task"]
    for b in plan:
        name = b["budget"]
        cols += [f"{name}: scratch", f"{name}: pretrained", f"{name}: gain (points)"]
        if "labels_per_class" in b:
            cols.append(f"{name}: kNN")
    if args.knn_all:
        cols.append("all labels: kNN")
    lines = [
        "# Label efficiency of the pretext tasks on Fashion-MNIST",
        "",
        f"Every task pretrains an encoder on {data['unlabelled_images']} unlabelled "
        f"Fashion-MNIST train images. An `evaluate` job of protocol `label_efficiency` then "
        f"fine-tunes, at every budget, one classifier from the encoder (pretrained) and one "
        f"from scratch with the same backbone, input size, labels, seed and settings, on a "
        f"subset of the {data['labelled_images']} labelled train images drawn by the service; "
        f"gain is pretrained minus scratch, in points. kNN is the weighted "
        f"{args.knn_k}-nearest-neighbour accuracy (cosine) of the frozen encoder, its "
        f"neighbours taken among the K-per-class subset uploaded by this script (seed "
        f"{args.seed}), or among all labelled train images. Every accuracy is measured on the "
        f"same {data['test_images']} test images.",
        "",
        "| " + " | ".join(cols) + " |",
        "|---|" + "---:|" * (len(cols) - 1),
    ]
    for run in runs:
        cells = [run.task]
        for row in run.rows(plan):
            cells += [pct(row["scratch_accuracy"]), pct(row["pretrained_accuracy"]),
                      fmt_points(row["gain_points"])]
            if "labels_per_class" in row:
                cells.append(pct(row["knn_accuracy"]))
        if args.knn_all:
            cells.append(pct(run.knn_all_accuracy()))
        lines.append("| " + " | ".join(cells) + " |")
    reference = ["raw pixels (reference, quoted)"]
    for b in plan:
        reference += ["", "", ""]
        if "labels_per_class" in b:
            quoted = RAW_PIXEL_KNN_REFERENCE.get(str(b["labels_per_class"]))
            reference.append(f"{100 * quoted:.1f} %" if quoted is not None else "")
    if args.knn_all:
        reference.append(f"{100 * RAW_PIXEL_KNN_REFERENCE['all']:.1f} %")
    lines.append("| " + " | ".join(reference) + " |")
    lines += [
        "",
        "Reference, quoted as given and not measured by this run: kNN on raw pixels reaches "
        "67.3 % with 10 labels per class, 76.4 % with 100 and 86.1 % with all labels.",
        "",
    ]
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
    lines += [
        "## Run",
        "",
        f"- Command: `{record['command']}`",
        f"- Date: {record['date']}",
        f"- Status: {record['status']}",
        f"- Client machine: `uname -m` = {record['machine']}, nproc = {record['nproc']}",
        f"- Server: {server['url']}, {server['workers']} training worker(s); "
        f"devices of its jobs (`GET /v1/jobs/{{id}}`): {devices}",
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


def write_plot(path, args, runs, plan, pyplot):
    """Test accuracy against labels per class (log x): one solid line per
    task from its encoder, one dashed line from scratch (the mean of the
    tasks' scratch runs). Returns the path, or None when nothing was drawn."""
    if pyplot is None:
        return None
    lines, scratch = [], {}
    for run in runs:
        measured = []
        for row in run.rows(plan):
            if row["labels"] is None or row["pretrained_accuracy"] is None:
                continue
            x = row["labels"] / len(CLASSES)
            measured.append((x, 100 * row["pretrained_accuracy"]))
            scratch.setdefault(x, []).append(100 * row["scratch_accuracy"])
        if measured:
            lines.append((run.task, sorted(measured)))
    if not lines:
        return None
    fig, ax = pyplot.subplots(figsize=(7, 4.5))
    for task, task_points in lines:
        ax.plot([p[0] for p in task_points], [p[1] for p in task_points], "-o",
                label=f"{task} (pretrained)")
    xs = sorted(scratch)
    ax.plot(xs, [sum(scratch[x]) / len(scratch[x]) for x in xs], "--s", color="black",
            label="from scratch" + (" (mean of the tasks' runs)" if len(lines) > 1 else ""))
    ax.set_xscale("log")
    ticks = []
    for x in xs:
        if not ticks or x > 1.25 * ticks[-1]:
            ticks.append(x)
    ax.xaxis.set_major_locator(pyplot.FixedLocator(ticks))
    ax.xaxis.set_minor_locator(pyplot.NullLocator())
    ax.set_xticklabels([f"{x:.3g}" for x in ticks])
    ax.set_xlabel("labels per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST: fine-tuning from each pretext task's encoder")
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
    ap.add_argument("--url", default="http://127.0.0.1:8080", help="pretext server URL")
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
    ap.add_argument("--knn-k", type=int, default=20, help="neighbours of the kNN jobs (default 20)")
    ap.add_argument("--no-knn-all", dest="knn_all", action="store_false",
                    help="skip the kNN job on the whole labelled train set")
    ap.add_argument("--test-limit", type=int, default=None,
                    help="use only the first N test images (default all 10000)")
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
    if args.epochs is not None and args.epochs < 1:
        ap.error("--epochs must be positive")
    if not 1 <= args.unlabelled <= 60000:
        ap.error("--unlabelled must be between 1 and 60000")
    if not 1 <= args.labelled_limit <= 60000:
        ap.error("--labelled-limit must be between 1 and 60000")
    if args.test_limit is not None and not 1 <= args.test_limit <= 10000:
        ap.error("--test-limit must be between 1 and 10000")
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


def upload_datasets(client, args):
    """Reads Fashion-MNIST, uploads the unlabelled pool, the labelled train
    set, the test set and the K-per-class subsets; returns them by role."""
    ensure_dataset()
    t = time.time()
    train_images, rows, cols = read_idx_images(os.path.join(DATASET_DIR, FILES["train_images"]))
    train_labels = read_idx_labels(os.path.join(DATASET_DIR, FILES["train_labels"]))
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
        indices = sorted(i for c in range(len(CLASSES)) for i in chosen[k][c])
        datasets["budgets"][str(k)] = upload(
            f"fmnist-{k}-per-class-seed{args.seed}-{tag}",
            class_folder_zip(train_pngs, train_labels, indices, "train"),
            len(indices), set(CLASSES),
        )
    return datasets


def main():
    args = parse_args()
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

    datasets = upload_datasets(client, args)
    state = {
        "benchmark": "label_efficiency",
        "command": redacted_command(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "status": "running",
        "machine": platform.machine(),
        "nproc": nproc(),
        "server": {"url": args.url, "workers": ready.get("workers")},
        "device_note": args.device_note,
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
        "raw_pixel_knn_reference": RAW_PIXEL_KNN_REFERENCE,
    }
    runs = [TaskRun(task) for task in args.tasks]
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
    plan = budget_plan(args)
    header = ["task"]
    for b in plan:
        knn = " / kNN" if "labels_per_class" in b else ""
        header.append(f"{b['budget']}: scratch / pretrained / gain{knn}")
    if args.knn_all:
        header.append("all labels: kNN")
    log("  |  ".join(header))
    for run in runs:
        cells = [run.task]
        for row in run.rows(plan):
            cell = [pct(row["scratch_accuracy"]), pct(row["pretrained_accuracy"]),
                    fmt_points(row["gain_points"])]
            if "labels_per_class" in row:
                cell.append(pct(row["knn_accuracy"]))
            cells.append(" / ".join(cell))
        if args.knn_all:
            cells.append(pct(run.knn_all_accuracy()))
        log("  |  ".join(cells))
    log(f"wrote {', '.join(paths)}")


if __name__ == "__main__":
    main()
