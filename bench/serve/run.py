"""Serving benchmark: pretext's /classify against FastAPI + PyTorch.

Usage: python bench/serve/run.py [--duration 15] [--concurrency 1,8,32,128]
           [--max-batch-size 32] [--max-batch-delay-ms 2] [--skip-build]
           [--device cpu|cuda] [--image-size 32] [--request-size 32]

Builds the release binary, starts `pretext serve` on the CPU against a fresh
database `pretext_bench_serve` and its own data folder (target/bench-serve),
with PRETEXT_API_KEY set and the bearer header sent. Through the HTTP API it
uploads a generated dataset (3 shape classes, 32x32 PNGs), pretrains a
resnet18 (rotation task, 32 px) briefly and fine-tunes it, then downloads the
classifier's weights and starts bench/reference/serve_fastapi.py with them
(torch.set_num_threads equal to pretext's intra-op threads). After checking
that both servers give the same answer for the bench image, it drives each
with wrk (bench/serve/post.lua: the same 32x32 PNG as a raw image body,
top_k=5) at every concurrency for a fixed duration after a warm-up, the two
servers back to back at each concurrency, recording `uptime` before each
side. Writes bench/results/serve.md and bench/results/serve.json.

With `--device cuda` both servers run the model on the GPU, and
bench/reference/gpu_synthetic.py measures plain PyTorch's ResNet-18
inference at batch 1 and 64 on random inputs already on the GPU (bf16
autocast) in the same run, as the ceiling the HTTP figures are set against.
`--image-size` is the model's input size (the server resizes every request
to it); `--request-size` the side of the PNG each request sends.

Needs wrk (apt-get install wrk), psql/dropdb, and fastapi, uvicorn and
python-multipart in the project venv (`make bench-setup`).
"""

import argparse
import datetime
import io
import json
import os
import platform
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile

from PIL import Image, ImageDraw

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
WORK = os.path.join(ROOT, "target", "bench-serve")
RESULTS = os.path.join(ROOT, "bench", "results")
DATABASE = "pretext_bench_serve"
API_KEY = "bench-serve-key"
OURS_PORT, REFERENCE_PORT = 8091, 8092
CLASSES = ["disc", "horizontal", "vertical"]
IMAGE_SIZE = 32


def log(message):
    print(f"[bench] {message}", flush=True)


def request(url, body=None, content_type=None, method=None, timeout=120):
    req = urllib.request.Request(url, data=body, method=method)
    req.add_header("Authorization", f"Bearer {API_KEY}")
    if content_type:
        req.add_header("Content-Type", content_type)
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return response.read()


def request_json(url, payload=None):
    body = None if payload is None else json.dumps(payload).encode()
    return json.loads(request(url, body, "application/json" if body else None))


def wait_until_up(url, process, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server at {url} exited with {process.returncode}")
        try:
            request(url, timeout=2)
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.3)
    sys.exit(f"{url} did not answer within {seconds} s")


def shape_image(kind, seed, side=IMAGE_SIZE):
    """A disc or stripe in seeded colours, like the tests' datasets, drawn at
    32x32 and scaled to `side`."""
    import random

    rng = random.Random(seed)
    bg = tuple(rng.randrange(0, 100) for _ in range(3))
    fg = tuple(rng.randrange(128, 256) for _ in range(3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    draw = ImageDraw.Draw(image)
    offset = rng.randrange(-4, 5)
    if kind == "disc":
        c, r = 16 + offset, rng.randrange(6, 11)
        draw.ellipse([c - r, c - r, c + r, c + r], fill=fg)
    elif kind == "horizontal":
        draw.rectangle([0, 12 + offset, 31, 19 + offset], fill=fg)
    else:
        draw.rectangle([12 + offset, 0, 19 + offset, 31], fill=fg)
    return image if side == IMAGE_SIZE else image.resize((side, side), Image.BILINEAR)


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def dataset_zip(per_class):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for k, kind in enumerate(CLASSES):
            for i in range(per_class):
                archive.writestr(f"{kind}/{i}.png", png(shape_image(kind, 1000 * k + i)))
    return buffer.getvalue()


def run_job(base, payload):
    job = request_json(f"{base}/v1/jobs", payload)
    while job["state"] in ("queued", "running"):
        time.sleep(1)
        job = request_json(f"{base}/v1/jobs/{job['id']}")
    if job["state"] != "succeeded":
        sys.exit(f"the {payload['kind']} job ended {job['state']}: {job.get('error')}")
    return job


def create_model(base, image_size):
    """Upload a dataset, pretrain and fine-tune a resnet18 at `image_size`;
    the classifier's JSON."""
    dataset = json.loads(
        request(f"{base}/v1/datasets?name=bench-shapes", dataset_zip(32), "application/zip")
    )
    log(f"dataset {dataset['id']}: {dataset['num_images']} images")
    job = run_job(
        base,
        {
            "kind": "pretrain",
            "dataset_id": dataset["id"],
            "config": {
                "backbone": "resnet18",
                "pretext": "rotation",
                "image_size": image_size,
                "max_steps": 5,
                "batch_size": 8,
            },
        },
    )
    log(f"pretrained encoder {job['model_id']}")
    job = run_job(
        base,
        {
            "kind": "finetune",
            "dataset_id": dataset["id"],
            "base_model_id": job["model_id"],
            "config": {"max_steps": 20, "batch_size": 8, "val_fraction": 0.2},
        },
    )
    model = request_json(f"{base}/v1/models/{job['model_id']}")
    log(f"fine-tuned classifier {model['id']}: metrics {model.get('metrics')}")
    return model


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def milliseconds(text):
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * UNITS[unit]


def parse_wrk(output):
    def find(pattern, default=None):
        match = re.search(pattern, output)
        return match.group(1) if match else default

    def latency(percentile):
        value = find(rf"\s{percentile}%\s+([\d.]+\w+)")
        return milliseconds(value) if value else float("nan")

    errors = find(r"Non-2xx or 3xx responses: (\d+)", "0")
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {
        "requests": int(find(r"(\d+) requests in")),
        "requests_per_s": float(find(r"Requests/sec:\s+([\d.]+)")),
        "p50_ms": latency(50),
        "p99_ms": latency(99),
        "non_2xx": int(errors),
        "socket_errors": sum(int(g) for g in socket.groups()) if socket else 0,
    }


def wrk(url, concurrency, duration, env, threads=2):
    command = [
        "wrk",
        f"-t{min(threads, concurrency)}",
        f"-c{concurrency}",
        f"-d{duration}s",
        "--timeout", "30s",
        "--latency",
        "-s", os.path.join(ROOT, "bench", "serve", "post.lua"),
        url,
    ]
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return " ".join(command), output


def synthetic_inference(model):
    """bench/reference/gpu_synthetic.py's inference figures for the served
    model's input: {batch size: images/s}."""
    command = [
        sys.executable, os.path.join(ROOT, "bench", "reference", "gpu_synthetic.py"),
        "--skip-train",
        "--inference-size", str(model["input"]["image_size"]),
        "--inference-channels", str(model["input"]["channels"]),
        "--classes", str(len(model["classes"])),
    ]
    log("running: " + " ".join(command))
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return {
        "command": " ".join(command),
        "images_per_second": {
            row["batch_size"]: row["images_per_second"]
            for row in rows if row.get("measurement") == "inference"
        },
    }


def uptime():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def compare_answers(ours, reference, image):
    a = json.loads(request(ours, image, "image/png"))["predictions"][0]
    b = json.loads(request(reference, image, "image/png"))["predictions"][0]
    labels_a, labels_b = [p["label"] for p in a], [p["label"] for p in b]
    difference = max(abs(x["score"] - y["score"]) for x, y in zip(a, b))
    if labels_a != labels_b or difference > 1e-4:
        sys.exit(f"the servers disagree on the bench image: {a} vs {b}")
    return difference


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--concurrency", default="1,8,32,128")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-batch-delay-ms", type=int, default=2)
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        help="intra-op threads of both servers (OMP_NUM_THREADS for pretext); default LibTorch's",
    )
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE,
                        help="the model's input size")
    parser.add_argument("--request-size", type=int, default=IMAGE_SIZE,
                        help="side of the PNG each request sends")
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--output", default="serve", help="name of the results files")
    parser.add_argument(
        "--binary",
        default=os.path.join(ROOT, "target", "release", "pretext"),
        help="the pretext binary to serve with",
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    device = "cuda:0" if args.device == "cuda" else args.device

    env = dict(os.environ, LIBTORCH_USE_PYTORCH="1")
    env["PATH"] = os.path.join(ROOT, ".venv", "bin") + os.pathsep + env["PATH"]
    if not args.skip_build:
        log("cargo build --release --locked")
        subprocess.run(["cargo", "build", "--release", "--locked"], cwd=ROOT, env=env, check=True)
    subprocess.run(["rm", "-rf", WORK], check=True)
    os.makedirs(WORK)
    subprocess.run(["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--if-exists", DATABASE], check=True)

    server_env = dict(env, PRETEXT_API_KEY=API_KEY, RUST_LOG="info,tower_http=warn,sqlx=warn")
    if args.threads:
        server_env["OMP_NUM_THREADS"] = str(args.threads)
    server_command = [
        args.binary, "serve",
        "--bind", f"127.0.0.1:{OURS_PORT}",
        "--database-url", f"postgres://postgres@127.0.0.1:5432/{DATABASE}",
        "--data-dir", os.path.join(WORK, "data"),
        "--devices", device, "--inference-device", device,
        "--max-batch-size", str(args.max_batch_size),
        "--max-batch-delay-ms", str(args.max_batch_delay_ms),
        # Room for every connection and no per-key limit: the bench measures
        # throughput, not refusals.
        "--inference-queue-depth", "1024",
        "--rate-limit-per-second", "0",
    ]
    server_log = open(os.path.join(WORK, "pretext.log"), "w")
    ours = subprocess.Popen(server_command, env=server_env, stdout=server_log, stderr=subprocess.STDOUT)
    reference = None
    try:
        base = f"http://127.0.0.1:{OURS_PORT}"
        wait_until_up(f"{base}/healthz", ours)
        with open(os.path.join(WORK, "pretext.log")) as f:
            plain = re.sub(r"\x1b\[[0-9;]*m", "", f.read())
        threads = int(re.search(r"intra_op_threads=(\d+)", plain).group(1))
        log(f"pretext is up; LibTorch intra-op threads: {threads}")

        model = create_model(base, args.image_size)
        model_path = os.path.join(WORK, "model.json")
        weights_path = os.path.join(WORK, "model.safetensors")
        with open(model_path, "w") as f:
            json.dump(model, f)
        with open(weights_path, "wb") as f:
            f.write(request(f"{base}/v1/models/{model['id']}/weights"))

        reference_command = [
            sys.executable, os.path.join(ROOT, "bench", "reference", "serve_fastapi.py"),
            "--weights", weights_path, "--model", model_path,
            "--threads", str(threads), "--port", str(REFERENCE_PORT),
            "--device", device,
        ]
        reference = subprocess.Popen(reference_command, stdout=server_log, stderr=subprocess.STDOUT)
        path = f"/v1/models/{model['id']}/classify?top_k=5"
        urls = {
            "pretext": f"{base}{path}",
            "reference": f"http://127.0.0.1:{REFERENCE_PORT}{path}",
        }
        wait_until_up(f"http://127.0.0.1:{REFERENCE_PORT}/docs", reference)

        image_path = os.path.join(WORK, "bench.png")
        image = png(shape_image("disc", 424242, args.request_size))
        with open(image_path, "wb") as f:
            f.write(image)
        difference = compare_answers(urls["pretext"], urls["reference"], image)
        log(f"both servers agree on the bench image (largest score difference {difference:.2e})")

        wrk_env = dict(env, BENCH_IMAGE=image_path, BENCH_API_KEY=API_KEY)
        for url in urls.values():
            wrk(url, 8, args.warmup, wrk_env, args.wrk_threads)
        runs = []
        for concurrency in levels:
            row = {"concurrency": concurrency}
            for side, url in urls.items():
                load = uptime()
                command, output = wrk(url, concurrency, args.duration, wrk_env, args.wrk_threads)
                row[side] = dict(parse_wrk(output), uptime_before=load, command=command, raw=output)
                log(f"c={concurrency} {side}: {row[side]['requests_per_s']:.1f} req/s, "
                    f"p50 {row[side]['p50_ms']:.2f} ms, p99 {row[side]['p99_ms']:.2f} ms "
                    f"({load})")
            reference_rate = row["reference"]["requests_per_s"]
            # None: the reference completed no request within the duration.
            row["ratio"] = row["pretext"]["requests_per_s"] / reference_rate if reference_rate else None
            runs.append(row)

        metrics = request(f"{base}/metrics").decode()
        batch = {
            name: float(value)
            for name, value in re.findall(r"^pretext_inference_batch_size_(sum|count) (\S+)$", metrics, re.M)
        }
    finally:
        for process in (reference, ours):
            if process is not None:
                process.terminate()
                process.wait(timeout=60)

    import torch

    synthetic = synthetic_inference(model) if args.device == "cuda" else None
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/serve/run.py " + " ".join(sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        },
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "model": {"backbone": model["backbone"], "image_size": args.image_size, "classes": CLASSES},
        "request_size": args.request_size,
        "synthetic_inference": synthetic,
        "intra_op_threads": threads,
        "max_batch_size": args.max_batch_size,
        "max_batch_delay_ms": args.max_batch_delay_ms,
        "duration_s": args.duration,
        "mean_batch_size": batch.get("sum", 0) / max(batch.get("count", 1), 1),
        "runs": runs,
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{args.output}.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(RESULTS, f"{args.output}.md"), "w") as f:
        f.write(markdown(report))
    log(f"wrote bench/results/{args.output}.md and .json")


def ratio(value):
    return "n/a (reference finished none)" if value is None else f"{value:.2f}x"


def markdown(report):
    lines = [
        "# Serving benchmark: pretext vs FastAPI + PyTorch",
        "",
        f"- Date: {report['date']}",
        f"- Command: `{report['command']}`",
        f"- Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs, "
        f"torch {report['machine']['torch']}, intra-op threads {report['intra_op_threads']} on both sides",
        f"- Device: {report['device']}" + (f" ({report['gpu']})" if report.get("gpu") else ""),
        f"- Model: {report['model']['backbone']} classifier at {report['model']['image_size']} px, "
        f"one {report['request_size']}x{report['request_size']} PNG per request as a raw body, top_k=5",
        f"- pretext: --max-batch-size {report['max_batch_size']} "
        f"--max-batch-delay-ms {report['max_batch_delay_ms']}; "
        f"mean merged batch over the run: {report['mean_batch_size']:.1f} images",
        f"- wrk, {report['duration_s']} s per row after a warm-up; the two servers back to back at each concurrency",
        "",
        "| concurrency | pretext req/s | p50 ms | p99 ms | reference req/s | p50 ms | p99 ms | req/s ratio | load before (pretext / reference) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in report["runs"]:
        ours, ref = run["pretext"], run["reference"]
        load = lambda side: side["uptime_before"].split("load average:")[-1].strip()  # noqa: E731
        lines.append(
            f"| {run['concurrency']} | {ours['requests_per_s']:.1f} | {ours['p50_ms']:.2f} | "
            f"{ours['p99_ms']:.2f} | {ref['requests_per_s']:.1f} | {ref['p50_ms']:.2f} | "
            f"{ref['p99_ms']:.2f} | {ratio(run['ratio'])} | {load(ours)} / {load(ref)} |"
        )
    errors = [
        f"c={r['concurrency']} {side}: {r[side]['non_2xx']} non-2xx, {r[side]['socket_errors']} socket errors"
        for r in report["runs"]
        for side in ("pretext", "reference")
        if r[side]["non_2xx"] or r[side]["socket_errors"]
    ]
    lines += ["", "Errors: " + ("; ".join(errors) if errors else "none."), ""]
    synthetic = report.get("synthetic_inference")
    if synthetic:
        rates = synthetic["images_per_second"]
        best = max(report["runs"], key=lambda run: run["pretext"]["requests_per_s"])
        lines += [
            "## Against the GPU's own ceiling",
            "",
            f"Plain PyTorch on random inputs already on the GPU (`{synthetic['command']}`, "
            "bf16 autocast, channels-last, no decoding, no copies, no HTTP): "
            + ", ".join(f"batch {b}: {r:.0f} images/s" for b, r in sorted(rates.items(), key=lambda x: int(x[0])))
            + ".",
            "",
        ]
        batch_one = rates.get(1) or rates.get("1")
        if batch_one:
            lines += [
                f"**pretext's best HTTP rate ({best['pretext']['requests_per_s']:.0f} classifications/s "
                f"at concurrency {best['concurrency']}) is {best['pretext']['requests_per_s'] / batch_one:.1f}x "
                "the batch-1 figure** (target: at least 10x).",
                "",
            ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
