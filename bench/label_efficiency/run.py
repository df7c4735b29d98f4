#!/usr/bin/env python3
"""Label efficiency of jigsaw pretraining on Fashion-MNIST.

Drives a running pretext server through its HTTP API only:

1. reads Fashion-MNIST from its IDX files;
2. uploads an unlabelled pool (the first N train images) and, for each budget
   K, a labelled dataset of K train images per class (seeded, nested budgets);
3. pretrains a jigsaw encoder on the unlabelled pool;
4. for each budget fine-tunes twice with the same settings: from the encoder
   and from scratch (same backbone and image size);
5. classifies the test set with every classifier and computes accuracy;
6. writes a Markdown report and the raw numbers as JSON.

Standard library only.
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
import uuid
import zipfile
import zlib

DATASET_DIR = "/usr/share/datasets/fashion-mnist"
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
CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}
DEFAULT_PRETRAIN = '{"backbone":"resnet18_small","image_size":32,"epochs":5,"batch_size":128}'
DEFAULT_FINETUNE = '{"epochs":30,"batch_size":64,"val_fraction":0.0}'
CLASSIFY_BATCH = 256
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
    """Makes sure the IDX files exist, installing the package if we can."""
    missing = [f for f in FILES.values() if not os.path.isfile(os.path.join(DATASET_DIR, f))]
    if not missing:
        return
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
    def __init__(self, method, url, status, body, headers=None):
        self.status = status
        self.body = body
        self.headers = headers or {}
        detail = body
        try:
            problem = json.loads(body)
            detail = f"{problem.get('title')}: {problem.get('detail')}"
            if problem.get("errors"):
                detail += " " + "; ".join(
                    f"{e.get('field')}: {e.get('message')}" for e in problem["errors"]
                )
        except (ValueError, AttributeError):
            pass
        super().__init__(f"{method} {url} -> {status}: {detail}")


class Client:
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


def multipart(files):
    """files: (filename, bytes, content type). Returns (body, content type)."""
    boundary = "----pretext-bench-" + uuid.uuid4().hex
    out = io.BytesIO()
    for name, data, ctype in files:
        out.write(f"--{boundary}\r\n".encode())
        out.write(
            f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n'.encode()
        )
        out.write(f"Content-Type: {ctype}\r\n\r\n".encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


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


class Jobs:
    """Creates jobs and waits for them; cancels what is left on failure."""

    def __init__(self, client, poll_interval):
        self.client = client
        self.poll_interval = poll_interval
        self.created = []

    def create(self, request):
        job = self.client.post_json("/v1/jobs", request)
        self.created.append(job["id"])
        return job

    def wait(self, label, job_id):
        while True:
            job = self.client.get(f"/v1/jobs/{job_id}")
            log(job_line(label, job))
            state = job["state"]
            if state == "succeeded":
                return job
            if state in ("failed", "cancelled"):
                die(f"job {label} ({job_id}) {state}: {job.get('error')}")
            time.sleep(self.poll_interval)

    def cancel_unfinished(self):
        for job_id in self.created:
            try:
                job = self.client.get(f"/v1/jobs/{job_id}")
                if job["state"] not in TERMINAL_STATES:
                    self.client.request("POST", f"/v1/jobs/{job_id}/cancel")
                    log(f"cancelled job {job_id}")
            except (ApiError, SystemExit) as e:
                log(f"could not cancel job {job_id}: {e}")


# --------------------------------------------------------------------------
# Evaluation


def classify_accuracy(client, model_id, test_pngs, test_labels, label):
    correct = 0
    per_class_total = [0] * len(CLASSES)
    per_class_correct = [0] * len(CLASSES)
    n = len(test_pngs)
    started = time.time()
    for start in range(0, n, CLASSIFY_BATCH):
        batch = test_pngs[start:start + CLASSIFY_BATCH]
        body, ctype = multipart(
            [(f"test_{start + i:05d}.png", png, "image/png") for i, png in enumerate(batch)]
        )
        resp = client.request("POST", f"/v1/models/{model_id}/classify?top_k=1", body, ctype)
        predictions = resp["predictions"]
        if len(predictions) != len(batch):
            die(f"classify returned {len(predictions)} predictions for {len(batch)} images")
        for i, pred in enumerate(predictions):
            truth = test_labels[start + i]
            per_class_total[truth] += 1
            guess = CLASS_INDEX.get(pred[0]["label"]) if pred else None
            if guess == truth:
                correct += 1
                per_class_correct[truth] += 1
    accuracy = correct / n if n else 0.0
    log(
        f"[{label}] test accuracy {accuracy:.4f} ({correct}/{n}) "
        f"in {time.time() - started:.1f} s"
    )
    per_class = {
        CLASSES[c]: (per_class_correct[c] / per_class_total[c] if per_class_total[c] else None)
        for c in range(len(CLASSES))
    }
    return accuracy, correct, per_class


# --------------------------------------------------------------------------
# Report


def nproc():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def write_report(out_dir, report):
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "label_efficiency.json")
    md_path = os.path.join(out_dir, "label_efficiency.md")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2, sort_keys=False)
        f.write("\n")

    def pct(x):
        return f"{100 * x:.2f} %"

    lines = [
        "# Label efficiency of jigsaw pretraining on Fashion-MNIST",
        "",
        f"Test accuracy on {report['test_images']} Fashion-MNIST test images of classifiers "
        f"fine-tuned on K labelled train images per class, from scratch and from an encoder "
        f"pretrained with the jigsaw task on {report['unlabelled_images']} unlabelled train "
        f"images. Both runs of a budget use the same fine-tuning settings.",
        "",
        "| labels per class | scratch accuracy | pretrained accuracy | gain (points) |",
        "|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['labels_per_class']} | {pct(r['scratch_accuracy'])} | "
            f"{pct(r['pretrained_accuracy'])} | {r['gain_points']:+.2f} |"
        )
    pre = report["pretrain"]
    lines += [
        "",
        "## Run",
        "",
        f"- Command: `{report['command']}`",
        f"- Server: {report['server_url']}",
        f"- Date: {report['date']}",
        f"- Client machine: `uname -m` = {report['machine']}, nproc = {report['nproc']}",
        f"- Training device(s): {', '.join(report['devices']) or 'unknown'}",
        f"- Seed for the labelled subsets: {report['seed']}",
        f"- Total wall time of the script: {report['script_wall_seconds']:.1f} s",
        "",
        "## Configs",
        "",
        "Pretrain (as sent, then as resolved by the server):",
        "",
        "```json",
        json.dumps(report["pretrain_config"]),
        json.dumps(pre["config"]),
        "```",
        "",
        "Fine-tune (as sent; the scratch runs also get the pretrain backbone and image_size):",
        "",
        "```json",
        json.dumps(report["finetune_config"]),
        "```",
        "",
        "Fine-tune as resolved by the server (scratch, then pretrained):",
        "",
        "```json",
        json.dumps(report["results"][0]["scratch_job"]["config"]),
        json.dumps(report["results"][0]["pretrained_job"]["config"]),
        "```",
        "",
        "## Jobs",
        "",
        "Wall time is the job's `finished_at - started_at`.",
        "",
        "| job | kind | labels per class | init | job id | device | wall time (s) | final metrics |",
        "|---|---|---:|---|---|---|---:|---|",
    ]
    jobs = [pre] + [j for r in report["results"] for j in (r["scratch_job"], r["pretrained_job"])]
    for j in jobs:
        wall = f"{j['wall_seconds']:.1f}" if j["wall_seconds"] is not None else "?"
        metrics = ", ".join(f"{k}={fmt_metric(v)}" for k, v in sorted(j["metrics"].items()))
        lines.append(
            f"| {j['label']} | {j['kind']} | {j.get('labels_per_class') or ''} | "
            f"{j.get('init') or ''} | `{j['id']}` | {j['device'] or '?'} | {wall} | {metrics} |"
        )
    lines.append("")
    with open(md_path, "w") as f:
        f.write("\n".join(lines))
    return md_path, json_path


# --------------------------------------------------------------------------


def parse_args():
    ap = argparse.ArgumentParser(
        description="Measure how many labels jigsaw pretraining saves on Fashion-MNIST."
    )
    ap.add_argument("--url", default="http://127.0.0.1:8080", help="pretext server URL")
    ap.add_argument("--api-key", default=os.environ.get("PRETEXT_API_KEY"),
                    help="API key (default: $PRETEXT_API_KEY)")
    ap.add_argument("--unlabelled", type=int, default=20000,
                    help="first N train images form the unlabelled pool (default 20000)")
    ap.add_argument("--labels-per-class", default="10,100",
                    help="comma-separated label budgets K per class (default 10,100)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the labelled subsets")
    ap.add_argument("--pretrain-config", default=DEFAULT_PRETRAIN, help="pretrain config JSON")
    ap.add_argument("--finetune-config", default=DEFAULT_FINETUNE, help="finetune config JSON")
    ap.add_argument("--test-limit", type=int, default=None,
                    help="use only the first N test images (default all 10000)")
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results"),
                    help="output folder (default bench/results in the repository)")
    ap.add_argument("--poll-interval", type=float, default=5.0, help="seconds between polls")
    args = ap.parse_args()
    try:
        args.budgets = sorted({int(x) for x in args.labels_per_class.split(",") if x.strip()})
    except ValueError:
        ap.error("--labels-per-class takes comma-separated integers, e.g. 10,100")
    if not args.budgets or min(args.budgets) < 1:
        ap.error("--labels-per-class needs at least one positive integer")
    for name in ("pretrain_config", "finetune_config"):
        try:
            value = json.loads(getattr(args, name))
        except ValueError as e:
            ap.error(f"--{name.replace('_', '-')} is not valid JSON: {e}")
        if not isinstance(value, dict):
            ap.error(f"--{name.replace('_', '-')} must be a JSON object")
        setattr(args, name, value)
    if not 1 <= args.unlabelled <= 60000:
        ap.error("--unlabelled must be between 1 and 60000")
    if args.test_limit is not None and not 1 <= args.test_limit <= 10000:
        ap.error("--test-limit must be between 1 and 10000")
    return args


def main():
    args = parse_args()
    script_start = time.time()
    command = shlex.join(["python3"] + sys.argv)
    client = Client(args.url, args.api_key)

    try:
        ready = client.get("/readyz")
    except ApiError as e:
        die(f"server not ready: {e}")
    log(f"server {args.url}: {ready.get('status')}, {ready.get('workers')} training worker(s)")
    if not ready.get("workers"):
        log("warning: the server runs no training workers; jobs will stay queued")

    ensure_dataset()
    t = time.time()
    train_images, rows, cols = read_idx_images(os.path.join(DATASET_DIR, FILES["train_images"]))
    train_labels = read_idx_labels(os.path.join(DATASET_DIR, FILES["train_labels"]))
    test_images, _, _ = read_idx_images(os.path.join(DATASET_DIR, FILES["test_images"]))
    test_labels = read_idx_labels(os.path.join(DATASET_DIR, FILES["test_labels"]))
    if args.test_limit:
        test_images, test_labels = test_images[:args.test_limit], test_labels[:args.test_limit]
    log(
        f"read Fashion-MNIST: {len(train_images)} train, {len(test_images)} test images "
        f"({cols}x{rows}) in {time.time() - t:.1f} s"
    )

    # Archives.
    t = time.time()
    tag = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    unlabelled_zip = build_zip(
        (f"img_{i:05d}.png", encode_png_gray(train_images[i], cols, rows))
        for i in range(args.unlabelled)
    )
    chosen = labelled_budgets(train_labels, args.budgets, args.seed)
    labelled_zips = {}
    for k in args.budgets:
        labelled_zips[k] = build_zip(
            (f"{CLASSES[c]}/train_{i:05d}.png", encode_png_gray(train_images[i], cols, rows))
            for c in range(len(CLASSES))
            for i in chosen[k][c]
        )
    test_pngs = [encode_png_gray(img, cols, rows) for img in test_images]
    log(
        f"encoded PNGs and zips in {time.time() - t:.1f} s: unlabelled "
        f"{len(unlabelled_zip) / 1e6:.1f} MB, "
        + ", ".join(f"K={k} {len(z) / 1e6:.2f} MB" for k, z in labelled_zips.items())
    )
    del train_images, test_images

    # Uploads.
    def upload(name, data):
        t = time.time()
        ds = client.request(
            "POST", "/v1/datasets?name=" + urllib.parse.quote(name), data, "application/zip"
        )
        log(
            f"uploaded {name}: id {ds['id']}, {ds['num_images']} images, labeled={ds['labeled']}, "
            f"channels={ds['channels']}, skipped={ds['skipped_count']} "
            f"({time.time() - t:.1f} s)"
        )
        return ds

    try:
        unlabelled_ds = upload(f"fmnist-unlabelled-{args.unlabelled}-{tag}", unlabelled_zip)
        if unlabelled_ds["num_images"] != args.unlabelled:
            die(f"unlabelled dataset has {unlabelled_ds['num_images']} images, "
                f"expected {args.unlabelled}")
        labelled_ds = {}
        for k in args.budgets:
            ds = upload(f"fmnist-{k}-per-class-seed{args.seed}-{tag}", labelled_zips[k])
            if sorted(ds["classes"]) != sorted(CLASSES) or ds["num_images"] != k * len(CLASSES):
                die(f"labelled dataset K={k} came back with classes {ds['classes']} "
                    f"and {ds['num_images']} images")
            labelled_ds[k] = ds
    except ApiError as e:
        die(str(e))
    del unlabelled_zip, labelled_zips

    jobs = Jobs(client, args.poll_interval)
    try:
        results, pretrain_record, devices = run_jobs(
            args, client, jobs, unlabelled_ds, labelled_ds, test_pngs, test_labels
        )
    except ApiError as e:
        jobs.cancel_unfinished()
        die(str(e))
    except (SystemExit, KeyboardInterrupt):
        jobs.cancel_unfinished()
        raise

    report = {
        "command": command,
        "server_url": args.url,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "nproc": nproc(),
        "devices": devices,
        "seed": args.seed,
        "unlabelled_images": args.unlabelled,
        "test_images": len(test_pngs),
        "pretrain_config": args.pretrain_config,
        "finetune_config": args.finetune_config,
        "datasets": {
            "unlabelled": unlabelled_ds["id"],
            "labelled": {str(k): ds["id"] for k, ds in labelled_ds.items()},
        },
        "pretrain": pretrain_record,
        "results": results,
        "script_wall_seconds": time.time() - script_start,
    }
    md_path, json_path = write_report(args.out, report)

    log("")
    log("labels/class  scratch   pretrained  gain (points)")
    for r in results:
        log(
            f"{r['labels_per_class']:>12}  {100 * r['scratch_accuracy']:6.2f} %  "
            f"{100 * r['pretrained_accuracy']:6.2f} %    {r['gain_points']:+.2f}"
        )
    log(f"wrote {md_path} and {json_path}")


def job_record(label, job, **extra):
    record = {
        "label": label,
        "id": job["id"],
        "kind": job["kind"],
        "model_id": job.get("model_id"),
        "device": job.get("device"),
        "attempts": job.get("attempts"),
        "started_at": job.get("started_at"),
        "finished_at": job.get("finished_at"),
        "wall_seconds": wall_seconds(job),
        "config": job.get("config"),
        "metrics": job.get("latest_metrics") or {},
    }
    record.update(extra)
    return record


def run_jobs(args, client, jobs, unlabelled_ds, labelled_ds, test_pngs, test_labels):
    pretrain = jobs.create(
        {"kind": "pretrain", "dataset_id": unlabelled_ds["id"], "config": args.pretrain_config}
    )
    resolved = pretrain["config"]
    log(f"pretrain job {pretrain['id']} queued with config {json.dumps(resolved)}")

    # Scratch runs do not need the encoder: queue them now so that servers
    # with several workers train them alongside the pretraining.
    scratch_config = dict(args.finetune_config)
    for key in ("backbone", "image_size"):
        if key in scratch_config and scratch_config[key] != resolved[key]:
            log(f"note: scratch runs use the pretrain {key} {resolved[key]!r}, "
                f"not {scratch_config[key]!r}")
        scratch_config[key] = resolved[key]
    scratch_jobs = {}
    for k in args.budgets:
        job = jobs.create(
            {"kind": "finetune", "dataset_id": labelled_ds[k]["id"], "config": scratch_config}
        )
        scratch_jobs[k] = job
        log(f"scratch finetune K={k} job {job['id']} queued")

    pretrain = jobs.wait("pretrain", pretrain["id"])
    encoder_id = pretrain["model_id"]
    pretrain_record = job_record("pretrain", pretrain, model_id=encoder_id)
    log(f"encoder {encoder_id} ready after {pretrain_record['wall_seconds']:.1f} s")

    pretrained_jobs = {}
    for k in args.budgets:
        job = jobs.create({
            "kind": "finetune",
            "dataset_id": labelled_ds[k]["id"],
            "base_model_id": encoder_id,
            "config": args.finetune_config,
        })
        pretrained_jobs[k] = job
        log(f"pretrained finetune K={k} job {job['id']} queued")

    results = []
    devices = set([pretrain.get("device")])
    for k in args.budgets:
        row = {"labels_per_class": k, "train_images": k * len(CLASSES)}
        for init, queued in (("scratch", scratch_jobs[k]), ("pretrained", pretrained_jobs[k])):
            label = f"finetune K={k} {init}"
            job = jobs.wait(label, queued["id"])
            devices.add(job.get("device"))
            accuracy, correct, per_class = classify_accuracy(
                client, job["model_id"], test_pngs, test_labels, label
            )
            row[f"{init}_accuracy"] = accuracy
            row[f"{init}_correct"] = correct
            row[f"{init}_per_class_accuracy"] = per_class
            row[f"{init}_job"] = job_record(
                label, job, labels_per_class=k, init=init, base_model_id=job.get("base_model_id")
            )
        row["gain_points"] = 100 * (row["pretrained_accuracy"] - row["scratch_accuracy"])
        results.append(row)
    return results, pretrain_record, sorted(d for d in devices if d)


if __name__ == "__main__":
    main()
