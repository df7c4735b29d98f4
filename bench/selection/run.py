#!/usr/bin/env python3
"""Does choosing what to label pay? On Fashion-MNIST, against a running
server: pretrain an encoder on a pool of unlabelled train images, embed the
pool, then for each seed choose BUDGET images at random and by each
selection strategy (`POST /v1/datasets/{id}/selections`), fine-tune the
encoder on the chosen images with their true labels (the service's default
fine-tuning), and measure accuracy on the 10,000 test images with a predict
job. Writes bench/results/<name>.{md,json} with each strategy's mean and
spread over the seeds.

    PRETEXT_API_KEY=… .venv/bin/python bench/selection/run.py --url http://127.0.0.1:8080
"""

import argparse
import importlib.util
import io
import json
import os
import random
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


def wait(client, job_id, what):
    return label_bench.wait_for_job(client, job_id, what)


def download(args, path):
    request = urllib.request.Request(
        args.url.rstrip("/") + path, headers={"Authorization": f"Bearer {args.api_key}"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return response.read()


def run_job(client, body, what):
    job = client.post_json("/v1/jobs", body)
    return wait(client, job["id"], what)


def accuracy(args, client, classifier_id, test_id, test_labels):
    job = run_job(client, {"kind": "predict", "dataset_id": test_id,
                           "base_model_id": classifier_id, "config": {"top_k": 1}}, "predict")
    table = download(args, f"/v1/jobs/{job['id']}/outputs/predictions.csv").decode()
    rows = table.strip().split("\n")[1:]
    correct = 0
    for row in rows:
        cells = row.split(",")
        image_id, predicted = int(cells[0]), cells[3]
        correct += predicted == label_bench.CLASSES[test_labels[image_id]]
    return correct / len(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=os.environ.get("PRETEXT_URL") or "http://127.0.0.1:8080")
    ap.add_argument("--api-key", default=os.environ.get("PRETEXT_API_KEY"))
    ap.add_argument("--pool", type=int, default=20000, help="unlabelled train images to choose from")
    ap.add_argument("--budget", type=int, default=100, help="images labelled per run")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--strategies", default="representative,diversity",
                    help="selection strategies compared with random choice")
    ap.add_argument("--pretrain-config", default="{}",
                    help="JSON config of the encoder's pretraining (default: the service's)")
    ap.add_argument("--finetune-config", default="{}",
                    help="JSON config added to every fine-tuning (default: the service's)")
    ap.add_argument("--pool-dataset", default=None,
                    help="reuse this uploaded pool (its first --pool train images, unlabelled)")
    ap.add_argument("--test-dataset", default=None,
                    help="reuse this uploaded test set (the 10,000 test images, in order)")
    ap.add_argument("--encoder", default=None,
                    help="reuse this encoder, pretrained on the pool, instead of pretraining one")
    ap.add_argument("--name", default="selection_cpu")
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results"))
    args = ap.parse_args()
    if not args.api_key:
        raise SystemExit("set PRETEXT_API_KEY or pass --api-key")
    client = label_bench.Client(args.url, args.api_key)
    started = time.monotonic()

    label_bench.ensure_dataset()
    directory = label_bench.DATASET_DIR
    files = label_bench.FILES
    train, rows, cols = label_bench.read_idx_images(os.path.join(directory, files["train_images"]))
    train_labels = label_bench.read_idx_labels(os.path.join(directory, files["train_labels"]))
    test, _, _ = label_bench.read_idx_images(os.path.join(directory, files["test_images"]))
    test_labels = label_bench.read_idx_labels(os.path.join(directory, files["test_labels"]))
    pool = list(range(args.pool))
    pngs = {i: label_bench.encode_png_gray(train[i], cols, rows) for i in pool}

    if args.pool_dataset:
        pool_set = client.get(f"/v1/datasets/{args.pool_dataset}")
    else:
        archive = label_bench.build_zip((f"pool_{i:05d}.png", pngs[i]) for i in pool)
        pool_set = client.request("POST", f"/v1/datasets?name=selection-pool-{args.pool}",
                                  archive, "application/zip")
    if args.test_dataset:
        test_set = client.get(f"/v1/datasets/{args.test_dataset}")
    else:
        test_archive = label_bench.build_zip(
            (f"{label_bench.CLASSES[test_labels[i]]}/test_{i:05d}.png",
             label_bench.encode_png_gray(test[i], cols, rows)) for i in range(len(test)))
        test_set = client.request("POST", "/v1/datasets?name=selection-test", test_archive,
                                  "application/zip")
    # Archive order is upload order, so predictions.csv's image_id indexes test_labels.
    log(f"pool {pool_set['id']} ({pool_set['num_images']} images), test {test_set['id']}")

    if args.encoder:
        encoder = client.get(f"/v1/models/{args.encoder}")
        pretrain = client.get(f"/v1/jobs/{encoder['job_id']}")
    else:
        pretrain = run_job(client, {"kind": "pretrain", "dataset_id": pool_set["id"],
                                    "config": json.loads(args.pretrain_config)}, "pretrain")
    encoder_id = pretrain["model_id"]
    log(f"encoder {encoder_id}: {pretrain['config'].get('pretext')} "
        f"{pretrain['config'].get('epochs')} epochs in {label_bench.wall_seconds(pretrain):.0f} s")
    embed = run_job(client, {"kind": "embed", "dataset_id": pool_set["id"],
                             "base_model_id": encoder_id}, "embed")
    log(f"embedded the pool in {label_bench.wall_seconds(embed):.0f} s")

    strategies = ["random"] + [s for s in args.strategies.split(",") if s]
    results = {s: [] for s in strategies}
    finetune_jobs = []
    for seed in range(args.seeds):
        for strategy in strategies:
            if strategy == "random":
                chosen = random.Random(seed).sample(pool, args.budget)
            else:
                selection = client.post_json(
                    f"/v1/datasets/{pool_set['id']}/selections",
                    {"budget": args.budget, "model_id": encoder_id, "strategy": strategy,
                     "seed": seed})
                chosen = selection["image_ids"]
            classes_covered = len({train_labels[i] for i in chosen})
            labelled = label_bench.build_zip(
                (f"{label_bench.CLASSES[train_labels[i]]}/pool_{i:05d}.png", pngs[i])
                for i in chosen)
            subset = client.request(
                "POST", f"/v1/datasets?name=selection-{strategy}-seed{seed}", labelled,
                "application/zip")
            config = {"seed": seed, **json.loads(args.finetune_config)}
            finetune = run_job(client, {"kind": "finetune", "dataset_id": subset["id"],
                                        "base_model_id": encoder_id, "config": config},
                               "finetune")
            finetune_jobs.append(finetune["config"])
            acc = accuracy(args, client, finetune["model_id"], test_set["id"], test_labels)
            results[strategy].append({"seed": seed, "accuracy": acc,
                                      "classes_covered": classes_covered,
                                      "transfer": finetune["config"].get("transfer")})
            log(f"seed {seed} {strategy:>15}: {acc * 100:.2f} % "
                f"({classes_covered}/10 classes among the {args.budget})")

    summary = {}
    for strategy, runs in results.items():
        values = [r["accuracy"] for r in runs]
        summary[strategy] = {
            "mean": statistics.mean(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
        }
    command = " ".join(["bench/selection/run.py"] + [
        a for a in sys.argv[1:] if not a.startswith("--api-key")])
    record = {
        "command": command,
        "pool": args.pool,
        "budget": args.budget,
        "seeds": args.seeds,
        "encoder": {"id": encoder_id, "config": pretrain["config"],
                    "seconds": label_bench.wall_seconds(pretrain)},
        "finetune_config": finetune_jobs[0] if finetune_jobs else None,
        "results": results,
        "summary": summary,
        "wall_seconds": round(time.monotonic() - started),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(record, f, indent=2)
    lines = [
        f"# Choosing {args.budget} images to label, against choosing them at random",
        "",
        f"Command (release server, one CPU worker): `{command}`",
        "",
        f"Measured {record['when']}, {record['wall_seconds'] / 60:.0f} min in all.",
        "",
        f"- Pool: the first {args.pool:,} Fashion-MNIST train images, uploaded unlabelled.",
        f"- Encoder: the service's default pretraining of the pool "
        f"({pretrain['config'].get('pretext')}, `{pretrain['config'].get('backbone')}`, "
        f"{pretrain['config'].get('epochs')} epochs, "
        f"{label_bench.wall_seconds(pretrain) / 60:.1f} min), then an embed job.",
        f"- Each run: {args.budget} pool images chosen (at random with Python's "
        "`random.Random(seed).sample`, or by `POST /v1/datasets/{id}/selections` with the "
        "strategy and seed), uploaded with their true labels, fine-tuned from the encoder "
        "with the service's default fine-tuning settings plus "
        f"`{args.finetune_config}` (seed = the run's seed; transfer "
        f"`{finetune_jobs[0].get('transfer') if finetune_jobs else '?'}`), then a predict job "
        "on the 10,000 test images.",
        "- Nothing was tuned on the test images: the strategies ran once each, with their "
        "defaults.",
        "",
        f"| strategy | mean | spread (stdev) | min | max | per seed |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for strategy, s in summary.items():
        per_seed = ", ".join(f"{r['accuracy'] * 100:.2f} % ({r['classes_covered']} classes)"
                             for r in results[strategy])
        lines.append(f"| {strategy} | {s['mean'] * 100:.2f} % | {s['stdev'] * 100:.2f} | "
                     f"{s['min'] * 100:.2f} % | {s['max'] * 100:.2f} % | {per_seed} |")
    best = max(summary, key=lambda s: summary[s]["mean"])
    lines += ["", f"Best mean: **{best}**, {summary[best]['mean'] * 100:.2f} % against random's "
              f"{summary['random']['mean'] * 100:.2f} %."]
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    log("\n".join(lines))


if __name__ == "__main__":
    main()
