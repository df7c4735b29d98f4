"""Soak: the release server under mixed load for a bounded time, its memory
sampled throughout.

Usage: python bench/soak/run.py [--minutes 20] [--skip-build] [--name soak_cpu]

Builds the release binary (unless --skip-build), starts `pretext serve` on
the CPU (one in-process worker, every other setting at its default: rate
limits and quotas included) on loopback, against a fresh database
`pretext_bench_soak` and its own data folder (target/bench-soak). Then, for
the given time, at once:
- a trainer loop uploads a new generated dataset (3 shape classes, 60
  images each, new seeds every round), pretrains on it, fine-tunes on it,
  hands the new classifier to the classify clients, and deletes the
  datasets and models older than the last two rounds;
- two classify clients post a 32x32 PNG to the newest classifier, 20
  requests per second each, and also list datasets, jobs and models;
- two SSE clients follow the event stream of the newest job for up to 30 s
  at a time, then reconnect;
- a sampler reads the server's resident memory (VmRSS) and open file
  descriptors from /proc every 5 s.

Every response is counted by status. Writes bench/results/<name>.json, .md
and .png (resident memory over time). The run passes when no response was a
5xx and resident memory in the last quarter of the run is at most 20 % above
its level in the second quarter (after warm-up).

Needs psql/dropdb and matplotlib in the project venv (`make bench-setup`).
"""

import argparse
import collections
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
WORK = os.path.join(ROOT, "target", "bench-soak")
RESULTS = os.path.join(ROOT, "bench", "results")
DATABASE = "pretext_bench_soak"
PORT = 8093
GROWTH_BOUND = 0.20

# The serving benchmark's helpers: its API key, generated images and archives.
_spec = importlib.util.spec_from_file_location("serve_bench", os.path.join(ROOT, "bench", "serve", "run.py"))
serve_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_bench)
API_KEY = serve_bench.API_KEY


class Tally:
    """Responses by status, and the first few 5xx bodies."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_status = collections.Counter()
        self.by_route = collections.Counter()
        self.server_errors = []
        self.transport_errors = collections.Counter()

    def record(self, route, status, body=b""):
        with self.lock:
            self.by_status[status] += 1
            self.by_route[route] += 1
            if status >= 500 and len(self.server_errors) < 20:
                self.server_errors.append({"route": route, "status": status, "body": body[:500].decode(errors="replace")})

    def transport(self, route, error):
        with self.lock:
            self.transport_errors[f"{route}: {type(error).__name__}"] += 1


def call(tally, base, route, path, body=None, content_type=None, method=None, timeout=120):
    """One request; returns (status, body), counting it."""
    req = urllib.request.Request(base + path, data=body, method=method)
    req.add_header("Authorization", f"Bearer {API_KEY}")
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            data = response.read()
            tally.record(route, response.status)
            return response.status, data
    except urllib.error.HTTPError as error:
        data = error.read()
        tally.record(route, error.code, data)
        if error.code == 429:
            time.sleep(float(error.headers.get("Retry-After", "1")))
        return error.code, data
    except (urllib.error.URLError, OSError) as error:
        tally.transport(route, error)
        return None, b""


def call_json(tally, base, route, path, payload=None, method=None):
    body = None if payload is None else json.dumps(payload).encode()
    status, data = call(tally, base, route, path, body, "application/json" if body else None, method)
    return status, (json.loads(data) if data and status and status < 300 else None)


class Shared:
    """What the trainer publishes for the other clients."""

    def __init__(self):
        self.lock = threading.Lock()
        self.classifier = None
        self.job = None
        self.rounds = 0
        self.failed_jobs = []


def wait_for_job(tally, base, job_id, stop):
    while not stop.is_set():
        status, job = call_json(tally, base, "GET /v1/jobs/{id}", f"/v1/jobs/{job_id}")
        if job and job["state"] not in ("queued", "running"):
            return job
        time.sleep(1)
    return None


def trainer(tally, base, shared, stop):
    kept = collections.deque()
    while not stop.is_set():
        round_ = shared.rounds
        archive = dataset_zip(60, seed=round_)
        status, data = call(tally, base, "POST /v1/datasets", f"/v1/datasets?name=soak-{round_}", archive, "application/zip")
        if status != 201:
            time.sleep(5)
            continue
        dataset = json.loads(data)["id"]
        models = []
        base_model = None
        for kind, config in [
            ("pretrain", {"max_steps": 60, "batch_size": 32, "checkpoint_interval_secs": 5}),
            ("finetune", {"max_steps": 60, "batch_size": 32}),
        ]:
            payload = {"kind": kind, "dataset_id": dataset, "config": config}
            if base_model:
                payload["base_model_id"] = base_model
            status, job = call_json(tally, base, "POST /v1/jobs", "/v1/jobs", payload)
            if not job:
                break
            with shared.lock:
                shared.job = job["id"]
            job = wait_for_job(tally, base, job["id"], stop)
            if not job or job["state"] != "succeeded":
                if job:
                    shared.failed_jobs.append({"kind": kind, "state": job["state"], "error": job.get("error")})
                break
            base_model = job["model_id"]
            models.append(base_model)
        if len(models) == 2:
            with shared.lock:
                shared.classifier = models[1]
        shared.rounds += 1
        kept.append((dataset, models))
        while len(kept) > 2:
            old_dataset, old_models = kept.popleft()
            for model in old_models:
                call(tally, base, "DELETE /v1/models/{id}", f"/v1/models/{model}", method="DELETE")
            call(tally, base, "DELETE /v1/datasets/{id}", f"/v1/datasets/{old_dataset}", method="DELETE")


def dataset_zip(per_class, seed):
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for k, kind in enumerate(serve_bench.CLASSES):
            for i in range(per_class):
                image = serve_bench.shape_image(kind, 100_000 * seed + 1000 * k + i)
                archive.writestr(f"{kind}/{i}.png", serve_bench.png(image))
    return buffer.getvalue()


def classifier_client(tally, base, shared, stop, index):
    image = serve_bench.png(serve_bench.shape_image("disc", 7 + index))
    n = 0
    while not stop.is_set():
        with shared.lock:
            model = shared.classifier
        started = time.time()
        if model:
            call(tally, base, "POST /v1/models/{id}/classify", f"/v1/models/{model}/classify?top_k=3", image, "image/png")
        n += 1
        if n % 20 == 0:
            path = ["/v1/datasets", "/v1/jobs", "/v1/models"][n // 20 % 3]
            call(tally, base, f"GET {path}", path)
        time.sleep(max(0.0, 0.05 - (time.time() - started)))


def sse_client(tally, base, shared, stop):
    while not stop.is_set():
        with shared.lock:
            job = shared.job
        if not job:
            time.sleep(1)
            continue
        req = urllib.request.Request(f"{base}/v1/jobs/{job}/events")
        req.add_header("Authorization", f"Bearer {API_KEY}")
        opened = time.time()
        try:
            with urllib.request.urlopen(req, timeout=35) as response:
                tally.record("GET /v1/jobs/{id}/events", response.status)
                while not stop.is_set() and time.time() - opened < 30:
                    if not response.readline():
                        break
            # A finished job's stream replays and ends: do not spin on it.
            time.sleep(1)
        except urllib.error.HTTPError as error:
            tally.record("GET /v1/jobs/{id}/events", error.code, error.read())
            time.sleep(1)
        except (urllib.error.URLError, OSError) as error:
            tally.transport("GET /v1/jobs/{id}/events", error)
            time.sleep(1)


def sample(pid):
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    rss_kib = int(fields["VmRSS"].split()[0])
    threads = int(fields["Threads"].strip())
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss_kib / 1024, threads, fds


def mean(values):
    return sum(values) / len(values) if values else float("nan")


def write_results(name, result):
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as out:
        json.dump(result, out, indent=2)
    samples = result["samples"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot([s["t_s"] / 60 for s in samples], [s["rss_mib"] for s in samples], label="resident memory")
        ax.axhline(result["memory"]["bound_mib"], color="red", linestyle="--", label="bound (last quarter)")
        ax.set_xlabel("minutes")
        ax.set_ylabel("MiB")
        ax.set_title(f"pretext serve under mixed load, {result['minutes']} min")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, f"{name}.png"), dpi=100)
    except ImportError:
        print("matplotlib is missing (make bench-setup): no plot", file=sys.stderr)
    memory = result["memory"]
    lines = [
        f"# Soak: {result['minutes']} minutes of mixed load",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']}; {result['date']}.",
        "",
        "| | |",
        "|---|---:|",
        f"| responses | {sum(result['by_status'].values())} |",
        f"| 5xx responses | {result['server_error_count']} |",
        f"| transport errors | {sum(result['transport_errors'].values())} |",
        f"| training rounds (upload, pretrain, fine-tune) | {result['rounds']} |",
        f"| failed jobs | {len(result['failed_jobs'])} |",
        f"| resident memory, second quarter (mean) | {memory['second_quarter_mib']:.0f} MiB |",
        f"| resident memory, last quarter (mean) | {memory['last_quarter_mib']:.0f} MiB |",
        f"| growth | {100 * memory['growth']:+.1f} % (bound {100 * GROWTH_BOUND:.0f} %) |",
        f"| resident memory, peak | {memory['peak_mib']:.0f} MiB |",
        f"| open file descriptors, first and last sample | {samples[0]['fds']} and {samples[-1]['fds']} |",
        f"| threads, first and last sample | {samples[0]['threads']} and {samples[-1]['threads']} |",
        "",
        "Responses by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(result["by_status"].items())) + ".",
        "",
        "Requests by route: " + ", ".join(f"`{k}` {v}" for k, v in sorted(result["by_route"].items())) + ".",
        "",
        f"Verdict: **{'passed' if result['passed'] else 'failed'}**.",
        "",
        f"![resident memory]({name}.png)",
    ]
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as out:
        out.write("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "pretext"))
    parser.add_argument("--name", default="soak_cpu")
    args = parser.parse_args()
    if not args.skip_build:
        subprocess.run(["cargo", "build", "--release", "--locked"], cwd=ROOT, check=True)
    subprocess.run(["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--if-exists", DATABASE], check=True)
    subprocess.run(["rm", "-rf", WORK], check=True)
    os.makedirs(WORK)
    env = dict(os.environ, PRETEXT_API_KEY=API_KEY, RUST_LOG="warn")
    base = f"http://127.0.0.1:{PORT}"
    log = open(os.path.join(WORK, "server.log"), "w")
    server = subprocess.Popen(
        [args.binary, "serve", "--bind", f"127.0.0.1:{PORT}", "--devices", "cpu", "--workers", "1",
         "--database-url", f"postgres://postgres@127.0.0.1:5432/{DATABASE}", "--data-dir", os.path.join(WORK, "data")],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        serve_bench.wait_until_up(f"{base}/readyz", server)
        tally, shared, stop = Tally(), Shared(), threading.Event()
        threads = [threading.Thread(target=trainer, args=(tally, base, shared, stop))]
        threads += [threading.Thread(target=classifier_client, args=(tally, base, shared, stop, i)) for i in range(2)]
        threads += [threading.Thread(target=sse_client, args=(tally, base, shared, stop)) for _ in range(2)]
        for thread in threads:
            thread.start()
        started = time.time()
        samples = []
        while time.time() - started < args.minutes * 60:
            if server.poll() is not None:
                break
            rss, thread_count, fds = sample(server.pid)
            samples.append({"t_s": round(time.time() - started, 1), "rss_mib": round(rss, 1), "threads": thread_count, "fds": fds})
            print(f"[soak] {samples[-1]} rounds {shared.rounds} responses {sum(tally.by_status.values())}", flush=True)
            time.sleep(5)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        alive = server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=60)
    quarter = max(1, len(samples) // 4)
    second = mean([s["rss_mib"] for s in samples[quarter:2 * quarter]])
    last = mean([s["rss_mib"] for s in samples[-quarter:]])
    server_errors = sum(v for k, v in tally.by_status.items() if k >= 500)
    growth = last / second - 1
    result = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPUs, {platform.platform()}",
        "minutes": args.minutes,
        "server_stayed_up": alive,
        "rounds": shared.rounds,
        "failed_jobs": shared.failed_jobs,
        "by_status": {str(k): v for k, v in sorted(tally.by_status.items())},
        "by_route": dict(tally.by_route),
        "server_error_count": server_errors,
        "server_errors": tally.server_errors,
        "transport_errors": dict(tally.transport_errors),
        "memory": {
            "second_quarter_mib": second,
            "last_quarter_mib": last,
            "growth": growth,
            "bound_mib": second * (1 + GROWTH_BOUND),
            "peak_mib": max(s["rss_mib"] for s in samples),
        },
        "samples": samples,
    }
    result["passed"] = alive and server_errors == 0 and growth <= GROWTH_BOUND and not shared.failed_jobs
    write_results(args.name, result)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
