#!/usr/bin/env python3
"""Similarity search at scale: embed a dataset of N Fashion-MNIST images
(100,000 by default: the 70,000 train and test images, then horizontally
flipped train images until N), then time `POST /v1/datasets/{id}/search`
over HTTP, by image id and by uploaded image, against a running server.

Reports the embed job's wall time and images/s, the first search (which
reads the embeddings into memory) and the latency percentiles of the
following ones, the search method the server reports (exact, or approximate
through its HNSW graph when the dataset has PRETEXT_ANN_MIN_IMAGES images or
more), the recall@k of the searches by image id against an exact ranking of
the downloaded embeddings, and writes bench/results/<name>.{md,json}.

    PRETEXT_API_KEY=… .venv/bin/python bench/search/run.py --url http://127.0.0.1:8080

With --dataset-id and --model-id it reuses a dataset embedded earlier (for
example by a run against the same server restarted with another
PRETEXT_ANN_MIN_IMAGES); --approximate waits until the searches go through
the graph, and reports how long that took.

The encoder's weights do not matter for latency: unless --model-id names
one, a one-step jigsaw pretraining on the dataset makes it.
"""

import argparse
import importlib.util
import io
import json
import os
import platform
import statistics
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
# The label-efficiency benchmark's Fashion-MNIST readers and HTTP client.
_spec = importlib.util.spec_from_file_location(
    "label_bench", os.path.join(REPO_ROOT, "bench", "label_efficiency", "run.py"))
label_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(label_bench)


def log(message):
    print(message, flush=True)


def flipped(pixels, width, height):
    return b"".join(pixels[y * width:(y + 1) * width][::-1] for y in range(height))


def images(count):
    label_bench.ensure_dataset()
    directory = label_bench.DATASET_DIR
    train, rows, cols = label_bench.read_idx_images(
        os.path.join(directory, label_bench.FILES["train_images"]))
    test, _, _ = label_bench.read_idx_images(
        os.path.join(directory, label_bench.FILES["test_images"]))
    pool = train + test
    extra = 0
    while len(pool) < count:
        pool.append(flipped(train[extra % len(train)], cols, rows))
        extra += 1
    return [label_bench.encode_png_gray(p, cols, rows) for p in pool[:count]], rows, cols


def wait(client, job_id, what):
    return label_bench.wait_for_job(client, job_id, what)


def timed_post(url, api_key, body=None, content_type=None):
    headers = {"Authorization": f"Bearer {api_key}"}
    if content_type:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.loads(response.read())
    return (time.perf_counter() - started) * 1000.0, answer


def download(url, api_key):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return response.read()


def exact_neighbours(embeddings, image_id, k):
    """The k most similar other rows by cosine similarity, as a set."""
    import numpy as np
    scores = embeddings @ embeddings[image_id]
    scores[image_id] = -np.inf
    return set(int(i) for i in np.argpartition(-scores, k)[:k])


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100.0 * (len(ordered) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=os.environ.get("PRETEXT_URL") or "http://127.0.0.1:8080")
    ap.add_argument("--api-key", default=os.environ.get("PRETEXT_API_KEY"))
    ap.add_argument("--images", type=int, default=100_000, help="images in the dataset")
    ap.add_argument("--queries", type=int, default=200, help="timed searches of each kind")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--model-id", default=None, help="an encoder to embed with")
    ap.add_argument("--dataset-id", default=None,
                    help="a dataset already embedded by --model-id: skip the upload and the embed job")
    ap.add_argument("--approximate", action="store_true",
                    help="wait until the searches go through the server's HNSW graph before timing them")
    ap.add_argument("--name", default="search_cpu")
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results"))
    args = ap.parse_args()
    if not args.api_key:
        raise SystemExit("set PRETEXT_API_KEY or pass --api-key")
    client = label_bench.Client(args.url, args.api_key)

    pngs, rows, cols = images(args.images)
    log(f"encoded {len(pngs)} images ({rows}x{cols})")
    upload_s = embed_s = None
    if args.dataset_id:
        if not args.model_id:
            raise SystemExit("--dataset-id needs --model-id")
        dataset = client.get(f"/v1/datasets/{args.dataset_id}")
        model_id = args.model_id
        assert dataset["num_images"] == len(pngs), "--images must match the dataset"
    else:
        archive = label_bench.build_zip((f"img_{i:06d}.png", png) for i, png in enumerate(pngs))
        started = time.monotonic()
        dataset = client.request(
            "POST", f"/v1/datasets?name=search-{len(pngs)}", archive, "application/zip")
        upload_s = time.monotonic() - started
        log(f"uploaded dataset {dataset['id']}: {dataset['num_images']} images in {upload_s:.1f} s")
        model_id = args.model_id
        if model_id is None:
            job = client.post_json("/v1/jobs", {
                "kind": "pretrain", "dataset_id": dataset["id"], "config": {"max_steps": 1}})
            model_id = wait(client, job["id"], "pretrain")["model_id"]
            log(f"encoder {model_id} (one step of jigsaw)")
        job = client.post_json("/v1/jobs", {
            "kind": "embed", "dataset_id": dataset["id"], "base_model_id": model_id})
        job = wait(client, job["id"], "embed")
        embed_s = label_bench.wall_seconds(job)
        log(f"embedded {len(pngs)} images in {embed_s:.1f} s")
    model = client.get(f"/v1/models/{model_id}")

    base = f"{args.url.rstrip('/')}/v1/datasets/{dataset['id']}/search?model_id={model_id}&k={args.k}"
    first_ms, answer = timed_post(f"{base}&image_id=0", args.api_key)
    assert len(answer["results"]) == args.k, answer
    embed_job_id = answer["embed_job_id"]
    report = client.get(f"/v1/jobs/{embed_job_id}/report")
    graph_s = None
    if args.approximate:
        started = time.monotonic()
        while answer["method"] != "approximate":
            if time.monotonic() - started > 3600:
                raise SystemExit("the searches did not go approximate within an hour")
            time.sleep(1.0)
            _, answer = timed_post(f"{base}&image_id=0", args.api_key)
        graph_s = time.monotonic() - started
        log(f"searches go through the graph {graph_s:.1f} s after the first")
    import numpy as np
    embeddings = np.load(io.BytesIO(download(
        f"{args.url.rstrip('/')}/v1/jobs/{embed_job_id}/outputs/embeddings.npy", args.api_key)))
    embeddings /= np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    by_id, methods, hits = [], {}, 0
    for q in range(args.queries):
        image_id = (q * 7919) % len(pngs)
        ms, answer = timed_post(f"{base}&image_id={image_id}", args.api_key)
        by_id.append(ms)
        methods[answer["method"]] = methods.get(answer["method"], 0) + 1
        found = {hit["image_id"] for hit in answer["results"]}
        hits += len(found & exact_neighbours(embeddings, image_id, args.k))
    recall = hits / (args.k * args.queries)
    by_upload = []
    for q in range(args.queries):
        png = pngs[(q * 104729) % len(pngs)]
        ms, answer = timed_post(base, args.api_key, png, "image/png")
        by_upload.append(ms)
        methods[answer["method"]] = methods.get(answer["method"], 0) + 1

    def summary(values):
        return {
            "p50_ms": round(statistics.median(values), 2),
            "p95_ms": round(percentile(values, 95), 2),
            "p99_ms": round(percentile(values, 99), 2),
            "mean_ms": round(statistics.mean(values), 2),
        }

    record = {
        "command": " ".join(["bench/search/run.py"] + [
            a for a in sys.argv[1:] if not a.startswith("--api-key")]),
        "url": args.url,
        "images": len(pngs),
        "image_size": f"{rows}x{cols}",
        "backbone": model["backbone"],
        "embedding_dim": report["embedding_dim"],
        "embeddings_bytes": next(f["bytes"] for f in report["files"] if f["name"] == "embeddings.npy"),
        "upload_seconds": upload_s and round(upload_s, 1),
        "embed_seconds": embed_s and round(embed_s, 1),
        "embed_images_per_second": embed_s and round(len(pngs) / embed_s, 1),
        "methods": methods,
        "graph_ready_seconds": graph_s and round(graph_s, 1),
        "recall_at_k_by_image_id": round(recall, 4),
        "k": args.k,
        "queries": args.queries,
        "first_search_ms": round(first_ms, 1),
        "by_image_id": summary(by_id),
        "by_uploaded_image": summary(by_upload),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(record, f, indent=2)
    by_id_s, by_up_s = record["by_image_id"], record["by_uploaded_image"]
    markdown = f"""# Similarity search over {len(pngs):,} images

Command (against a release server with one CPU worker): `{record['command']}`

Measured {record['when']} on {record['machine']}, over loopback HTTP, one client.

- Dataset: {len(pngs):,} Fashion-MNIST images ({rows}x{cols}): the 70,000 train and test images, then horizontally flipped train images.
- Encoder: `{record['backbone']}`, {record['embedding_dim']}-dimensional embeddings ({record['embeddings_bytes'] / 1e6:.1f} MB of float32).
- Embed job: {f"{record['embed_seconds']} s, {record['embed_images_per_second']} images/s (decoding the dataset's images once included)" if embed_s else "reused from an earlier run"}.
- First search (reads `embeddings.npy` into memory unless the server holds it): {record['first_search_ms']} ms.
- Search method reported by the server for the timed searches: {", ".join(f"{n} {m}" for m, n in sorted(methods.items()))}.{f" They went through the HNSW graph {record['graph_ready_seconds']} s after the first search (the graph is built in the background)." if graph_s else ""}
- Recall@{args.k} of the searches by image id against an exact ranking of the downloaded embeddings: {record['recall_at_k_by_image_id']:.4f}.

| search, k = {args.k}, {args.queries} queries each | p50 | p95 | p99 | mean |
|---|---:|---:|---:|---:|
| by image id | {by_id_s['p50_ms']} ms | {by_id_s['p95_ms']} ms | {by_id_s['p99_ms']} ms | {by_id_s['mean_ms']} ms |
| by uploaded PNG (decode, embed, then search) | {by_up_s['p50_ms']} ms | {by_up_s['p95_ms']} ms | {by_up_s['p99_ms']} ms | {by_up_s['mean_ms']} ms |
"""
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write(markdown)
    log(markdown)


if __name__ == "__main__":
    main()
