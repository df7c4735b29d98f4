#!/usr/bin/env python3
"""Training throughput of pretext against a plain PyTorch script.

1. starts the release server on the CPU (fresh database `pretext_bench_train`,
   its own data folder, an API key) and uploads the first N Fashion-MNIST
   train images as an unlabelled dataset of PNGs;
2. runs a jigsaw pretrain job for a fixed number of steps and reads its
   images/s from the job's metrics (every report after the warm-up steps);
3. stops the server, then runs `bench/reference/train_jigsaw.py` with the
   settings the server resolved (input size, tile size, grid, permutations,
   batch size, optimiser) and the same number of LibTorch threads;
4. writes `bench/results/train_throughput.md` and `.json`.

With `--device cuda` the job trains on the GPU and step 3 runs
`bench/reference/gpu_synthetic.py` instead: the same network in PyTorch eager
on random tiles already on the GPU, fp32 and bf16 autocast, the ceiling the
service's real data pipeline is measured against (results named
`train_throughput_gpu` unless `--name` says otherwise).

Standard library only (the reference needs the venv's torch).
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATABASE = "pretext_bench_train"
API_KEY = "pretext-bench-train-key"


def load_label_efficiency():
    """The Fashion-MNIST readers, PNG/zip writers and HTTP client of the
    label-efficiency benchmark."""
    path = os.path.join(REPO_ROOT, "bench", "label_efficiency", "run.py")
    spec = importlib.util.spec_from_file_location("label_efficiency", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


le = load_label_efficiency()
log, die = le.log, le.die


class BearerKey(le.urllib.request.BaseHandler):
    """Sends the server's API key with every request."""

    def http_request(self, request):
        request.add_header("Authorization", f"Bearer {API_KEY}")
        return request


le.urllib.request.install_opener(le.urllib.request.build_opener(BearerKey()))


def uptime():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(binary, data_dir, port, postgres, device):
    subprocess.run(
        ["psql", postgres + "/postgres", "-q", "-c", f"drop database if exists {DATABASE}"],
        check=True,
    )
    env = dict(
        os.environ,
        DATABASE_URL=f"{postgres}/{DATABASE}",
        PRETEXT_BIND=f"127.0.0.1:{port}",
        PRETEXT_DATA_DIR=data_dir,
        PRETEXT_DEVICES=device,
        PRETEXT_INFERENCE_DEVICE=device,
        PRETEXT_POLL_INTERVAL_MS="200",
        PRETEXT_API_KEY=API_KEY,
        RUST_LOG=os.environ.get("RUST_LOG", "warn"),
    )
    log_file = open(os.path.join(data_dir, "server.log"), "w")
    server = subprocess.Popen([binary, "serve"], env=env, stdout=log_file, stderr=log_file)
    client = le.Client(f"http://127.0.0.1:{port}")
    for _ in range(600):
        if server.poll() is not None:
            die(f"the server exited with {server.returncode}; see {log_file.name}")
        try:
            with le.urllib.request.urlopen(f"{client.base}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return server, client
        except OSError:
            pass
        time.sleep(0.5)
    server.terminate()
    die("the server did not become ready in 5 minutes")


def stop_server(server):
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def harmonic_throughput(points, warmup_steps):
    """Images/s over every report window after the warm-up steps: each
    window covers the same number of images, so the rate over all of them is
    the harmonic mean of the windows' rates."""
    rates = [p["value"] for p in points if p["step"] > warmup_steps]
    if not rates:
        die(f"no images_per_second reported after step {warmup_steps}")
    return len(rates) / sum(1.0 / r for r in rates), rates


def run_service(args, pngs, cols, rows):
    data_dir = tempfile.mkdtemp(prefix="pretext-bench-train-")
    server, client = start_server(args.binary, data_dir, free_port(), args.postgres, args.device)
    try:
        archive = le.build_zip((f"img_{i:05d}.png", png) for i, png in enumerate(pngs))
        ds = client.request("POST", "/v1/datasets?name=" + urllib.parse.quote(
            f"fmnist-{len(pngs)}"), archive, "application/zip")
        log(f"uploaded {ds['num_images']} images ({cols}x{rows}, {ds['channels']} channel)")
        channels = ds["channels"]
        config = dict(json.loads(args.config), max_steps=args.steps)
        load = uptime()
        log(f"service side, load at start: {load}")
        job = client.post_json("/v1/jobs", {"kind": "pretrain", "dataset_id": ds["id"],
                                            "config": config})
        while True:
            job = client.get(f"/v1/jobs/{job['id']}")
            if job["state"] == "succeeded":
                break
            if job["state"] in ("failed", "cancelled"):
                die(f"pretrain job {job['state']}: {job.get('error')}")
            time.sleep(2)
        log(le.job_line("pretrain", job))
        points = client.get(f"/v1/jobs/{job['id']}/metrics?name=images_per_second")["points"]
        throughput, rates = harmonic_throughput(points, args.warmup_steps)
        waits = [p["value"] for p in client.get(
            f"/v1/jobs/{job['id']}/metrics?name=batch_wait_ms")["points"]
            if p["step"] > args.warmup_steps]
        model = client.get(f"/v1/models/{job['model_id']}")
        threads = subprocess.run(
            [args.python, "-c", "import torch; print(torch.get_num_threads())"],
            capture_output=True, text=True, check=True).stdout.strip()
        return {
            "images_per_second": throughput,
            "window_images_per_second": rates,
            "batch_wait_ms": sum(waits) / len(waits) if waits else None,
            "uptime_at_start": load,
            "job_wall_seconds": le.wall_seconds(job),
            "resolved_config": job["config"],
            "pretext_config": model.get("pretext_config"),
            "libtorch_threads": int(threads),
            "channels": channels,
            "final_metrics": job.get("latest_metrics"),
        }
    finally:
        stop_server(server)


# glibc's variables for the allocator settings pretext applies to itself at
# start (src/ml/allocator.rs), for a reference run under the same settings.
PRETEXT_ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
                         "MALLOC_TOP_PAD_": str(256 << 20)}


def run_reference(args, service, extra_env=None):
    c = service["resolved_config"]
    if c["backbone"] != "convnet":
        die("the reference implements the convnet trunk only")
    command = [
        args.python, os.path.join(REPO_ROOT, "bench", "reference", "train_jigsaw.py"),
        "--images", str(args.images),
        "--image-size", str(c["image_size"]),
        "--grid", str(c["grid"]),
        "--tile-size", str(c["tile_size"]),
        "--num-permutations", str(c["num_permutations"]),
        "--permutation-seed", str(c["permutation_seed"]),
        "--grayscale-probability", str(c["grayscale_probability"]),
        "--channel-jitter", str(c["channel_jitter"]),
        "--batch-size", str(c["batch_size"]),
        "--learning-rate", str(c["learning_rate"]),
        "--weight-decay", str(c["weight_decay"]),
        "--steps", str(args.steps),
        "--warmup-steps", str(args.warmup_steps),
        "--threads", str(service["libtorch_threads"]),
        "--workers", str(args.workers),
        "--seed", str(c["seed"]),
    ]
    load = uptime()
    log(f"reference side, load at start: {load}")
    env_words = [f"{k}={v}" for k, v in sorted((extra_env or {}).items())]
    log("running: " + shlex.join(env_words + command))
    done = subprocess.run(command, capture_output=True, text=True,
                          env=dict(os.environ, **(extra_env or {})))
    sys.stdout.write(done.stdout)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        die(f"the reference exited with {done.returncode}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["uptime_at_start"] = load
    result["command"] = shlex.join(env_words + command)
    return result


def run_gpu_reference(args, service):
    c = service["resolved_config"]
    if c["backbone"] != "resnet18":
        die("the GPU reference implements the resnet18 trunk only")
    command = [
        args.python, os.path.join(REPO_ROOT, "bench", "reference", "gpu_synthetic.py"),
        "--skip-inference",
        "--channels", str(service["channels"]),
        "--grid", str(c["grid"]),
        "--tile-size", str(c["tile_size"]),
        "--permutations", str(c["num_permutations"]),
        "--batch-size", str(c["batch_size"]),
        "--steps", str(args.steps),
        "--warmup-steps", str(args.warmup_steps),
    ]
    log("running: " + shlex.join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    sys.stdout.write(done.stdout)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        die(f"the GPU reference exited with {done.returncode}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {
        "command": shlex.join(command),
        "device": rows[0].get("device"),
        "fp32": next(r for r in rows if r.get("precision") == "fp32"),
        "bf16": next(r for r in rows if r.get("precision", "").startswith("bf16")),
    }


def write_gpu_report(out_dir, name, report):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    s, r = report["service"], report["reference"]
    c = s["resolved_config"]
    lines = [
        "# Training throughput on a GPU: pretext's data pipeline against the kernels alone",
        "",
        f"Jigsaw pretraining on {report['images']} Fashion-MNIST train images (28x28 grey, "
        f"uploaded as PNGs, resized by the service to {c['image_size']} px), {c['backbone']} trunk "
        f"on a {c['grid']}x{c['grid']} grid of {c['tile_size']} px tiles, "
        f"{c['num_permutations']} permutations, batch {c['batch_size']}, AdamW, on {r['device']}. "
        f"pretext: images/s over steps {report['warmup_steps'] + 1}-{report['steps']} of a real "
        "job (decoded-image cache, tiles cut on CPU threads, prefetch, bf16 autocast). Reference: "
        "the same network in PyTorch eager on random tiles already on the GPU (no data at all).",
        "",
        "| side | images/s |",
        "|---|---:|",
        f"| pretext jigsaw job, real data pipeline | {s['images_per_second']:.0f} |",
        f"| PyTorch eager, synthetic inputs, fp32 | {r['fp32']['images_per_second']:.0f} |",
        f"| PyTorch eager, synthetic inputs, bf16 autocast | {r['bf16']['images_per_second']:.0f} |",
        "",
        f"**Ratio (pretext / synthetic bf16): {report['ratio']:.2f}x** (target: at least 0.9x); "
        f"against synthetic fp32: {s['images_per_second'] / r['fp32']['images_per_second']:.2f}x.",
        "",
        f"Mean wait for the next batch in pretext: {fmt_ms(s.get('batch_wait_ms'))} per step; "
        f"whole step {fmt_ms(1e3 * c['batch_size'] / s['images_per_second'])}.",
        "",
        "## Run",
        "",
        f"- Command: `{report['command']}`",
        f"- Reference command: `{r['command']}`",
        f"- Date: {report['date']}",
        f"- Machine: {report['machine']}",
        "- Service report windows (images/s, 10 steps each): "
        + ", ".join(f"{x:.0f}" for x in s["window_images_per_second"]),
        f"- Pretrain config as resolved by the server: `{json.dumps(c, sort_keys=True)}`",
        "",
    ]
    if report.get("notes"):
        lines += ["## Notes", "", report["notes"], ""]
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write("\n".join(lines))
    log(f"wrote {out_dir}/{name}.md and .json")


def fmt_ms(value):
    return "n/a" if value is None else f"{value:.1f} ms"


def write_report(out_dir, name, report):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    rounds = report["rounds"]
    s, r = rounds[0]["service"], rounds[0]["reference"]
    c = s["resolved_config"]
    same_allocator = "reference_pretext_allocator" in rounds[0]
    header = "| round | pretext images/s | reference images/s | ratio |"
    rule = "|---:|---:|---:|---:|"
    if same_allocator:
        header += " reference with pretext's allocator settings, images/s | ratio |"
        rule += "---:|---:|"
    table = [header, rule]
    for i, entry in enumerate(rounds, 1):
        row = (f"| {i} | {entry['service']['images_per_second']:.2f} | "
               f"{entry['reference']['images_per_second']:.2f} | {entry['ratio']:.2f}x |")
        if same_allocator:
            row += (f" {entry['reference_pretext_allocator']['images_per_second']:.2f} | "
                    f"{entry['ratio_pretext_allocator']:.2f}x |")
        table.append(row)
    headline = (f"**Ratio (pretext / reference), median of {len(rounds)} round(s): "
                f"{report['ratio']:.2f}x** (target: at least 1.2x).")
    if same_allocator:
        headline += (" Against the reference run with the same allocator settings as "
                     f"pretext: {report['ratio_pretext_allocator']:.2f}x.")
    lines = [
        "# Training throughput: pretext against a PyTorch script",
        "",
        f"Jigsaw pretraining on {report['images']} Fashion-MNIST train images (28x28 grey, "
        f"uploaded as PNGs), {c['backbone']} trunk at the service's default input size for "
        f"this data ({c['image_size']} px: a {c['grid']}x{c['grid']} grid of {c['tile_size']} px "
        f"tiles), {c['num_permutations']} permutations, batch {c['batch_size']}, AdamW "
        f"(lr {c['learning_rate']}, weight decay {c['weight_decay']}), CPU, "
        f"{s['libtorch_threads']} LibTorch threads on both sides. Images/s over steps "
        f"{report['warmup_steps'] + 1}-{report['steps']} (the first {report['warmup_steps']} "
        f"left out as warm-up), batch building included. Each round runs pretext, then the "
        f"PyTorch reference (`bench/reference/train_jigsaw.py`, {r['workers']} DataLoader "
        "worker) as a user runs it"
        + (", then the reference again under pretext's allocator settings "
           "(`" + " ".join(f"{k}={v}" for k, v in sorted(PRETEXT_ALLOCATOR_ENV.items()))
           + "`, what pretext sets for itself at start)" if same_allocator else "")
        + "; each ratio compares sides of the same round.",
        "",
        *table,
        "",
        headline,
        "",
        "Where a step's time goes (mean per step over the measured steps, round 1): waiting "
        f"for the batch {fmt_ms(s.get('batch_wait_ms'))} in pretext, "
        f"{fmt_ms(r.get('batch_wait_ms'))} in the reference; the reference's forward, backward "
        f"and optimiser step {fmt_ms(r.get('step_compute_ms'))}; pretext's whole step "
        f"{fmt_ms(1e3 * c['batch_size'] / s['images_per_second'])}.",
        "",
        "Load at the start of each side (`uptime`):",
        "",
    ]
    for i, entry in enumerate(rounds, 1):
        sides = [("pretext", entry["service"]), ("reference", entry["reference"])]
        if same_allocator:
            sides.append(("reference, pretext's allocator settings",
                          entry["reference_pretext_allocator"]))
        for label, side in sides:
            lines.append(f"- round {i}, {label}: {side['uptime_at_start']}")
    lines += [
        "",
        "## Run",
        "",
        f"- Command: `{report['command']}`",
        f"- Reference command: `{r['command']}`",
        f"- Date: {report['date']}",
        f"- Machine: {report['machine']}",
        f"- Service report windows (images/s, 10 steps each), round 1: "
        + ", ".join(f"{x:.2f}" for x in s["window_images_per_second"]),
        f"- Pretrain config as resolved by the server: `{json.dumps(c, sort_keys=True)}`",
        "",
    ]
    if report.get("notes"):
        lines += ["## Notes", "", report["notes"], ""]
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write("\n".join(lines))
    log(f"wrote {out_dir}/{name}.md and .json")


def run_cpu_round(args, pngs, cols, rows, number):
    """pretext, then the reference as a user runs it, then (if asked) the
    reference under pretext's allocator settings, back to back."""
    log(f"round {number} of {args.rounds}")
    service = run_service(args, pngs, cols, rows)
    log(f"pretext: {service['images_per_second']:.2f} images/s")
    reference = run_reference(args, service)
    log(f"reference: {reference['images_per_second']:.2f} images/s")
    entry = {"service": service, "reference": reference,
             "ratio": service["images_per_second"] / reference["images_per_second"]}
    if args.same_allocator_reference:
        tuned = run_reference(args, service, PRETEXT_ALLOCATOR_ENV)
        log(f"reference with pretext's allocator settings: "
            f"{tuned['images_per_second']:.2f} images/s")
        entry["reference_pretext_allocator"] = tuned
        entry["ratio_pretext_allocator"] = (
            service["images_per_second"] / tuned["images_per_second"])
    return entry


def machine():
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {le.nproc()} cores available, {platform.system()} {platform.machine()}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", default=os.path.join(REPO_ROOT, "target", "release", "pretext"))
    parser.add_argument("--python", default=os.path.join(REPO_ROOT, ".venv", "bin", "python"))
    parser.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup-steps", type=int, default=10,
                        help="a multiple of the server's report interval (10 steps)")
    parser.add_argument("--config", default='{"pretext":"jigsaw","backbone":"convnet",'
                        '"batch_size":64,"epochs":1,"seed":0}',
                        help="pretrain config (JSON); max_steps is set from --steps")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1,
                        help="CPU: rounds of pretext then reference; the ratio quoted is "
                        "the median of the rounds' ratios")
    parser.add_argument("--same-allocator-reference", action=argparse.BooleanOptionalAction,
                        default=True, help="CPU: also run the reference in each round under "
                        "the glibc allocator settings pretext applies to itself")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda:N to train on a GPU")
    parser.add_argument("--name", help="results file name (default train_throughput, "
                        "train_throughput_gpu on a GPU)")
    parser.add_argument("--notes", default="", help="a paragraph added to the report")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results"))
    args = parser.parse_args()
    if not os.access(args.binary, os.X_OK):
        die(f"{args.binary} is missing: run `make build` first")

    le.ensure_dataset()
    images, rows, cols = le.read_idx_images(
        os.path.join(le.DATASET_DIR, le.FILES["train_images"]))
    pngs = [le.encode_png_gray(images[i], cols, rows) for i in range(args.images)]
    del images

    gpu = args.device.startswith("cuda")
    report = {
        "images": args.images,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "device": args.device,
        "command": shlex.join([os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "notes": args.notes,
        "binary": os.path.relpath(args.binary, REPO_ROOT),
    }
    if gpu:
        service = run_service(args, pngs, cols, rows)
        log(f"pretext: {service['images_per_second']:.2f} images/s")
        reference = run_gpu_reference(args, service)
        reference_rate = reference["bf16"]["images_per_second"]
        log(f"reference: {reference_rate:.2f} images/s")
        report.update(ratio=service["images_per_second"] / reference_rate,
                      service=service, reference=reference)
    else:
        report["rounds"] = [run_cpu_round(args, pngs, cols, rows, i)
                            for i in range(1, args.rounds + 1)]
        report["ratio"] = statistics.median(e["ratio"] for e in report["rounds"])
        if args.same_allocator_reference:
            report["ratio_pretext_allocator"] = statistics.median(
                e["ratio_pretext_allocator"] for e in report["rounds"])
    log(f"ratio: {report['ratio']:.2f}x")
    if gpu:
        write_gpu_report(args.out, args.name or "train_throughput_gpu", report)
    else:
        write_report(args.out, args.name or "train_throughput", report)


if __name__ == "__main__":
    main()
