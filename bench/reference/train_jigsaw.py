#!/usr/bin/env python3
"""Jigsaw pretraining written the way a PyTorch user would, as the reference
for pretext's training throughput.

The same context-free network as the service (the `convnet` trunk: four
3x3 conv/BN/ReLU blocks of 32, 64, 128 and 256 channels with 2x2 max-pools
after the second and third, global average pooling; then a per-tile fc of
512, concatenation, an fc of 1024 with dropout 0.5, and the permutation
classifier), the same tile pipeline (random crop of a grid x grid area, one
randomly shifted tile per cell, grey/colour jitter for colour images, every
tile normalised by its own mean and std, one permutation of a fixed set of
maximal Hamming distance), the same AdamW and learning-rate schedule.

Data: the first N Fashion-MNIST train images, resized once (bilinear, shorter
side to the input size, centre crop) when the dataset is built. Batches come
from a Dataset whose __getitem__ cuts one puzzle, through a DataLoader.

Prints one JSON object on the last line of stdout: images/s measured from
the end of the warm-up steps to the end of the run, data loading included.
"""

import argparse
import gzip
import itertools
import json
import math
import os
import random
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

DATASET = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def read_idx_images(path, limit):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, count, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != 2051:
        sys.exit(f"{path}: not an IDX image file")
    count = min(count, limit)
    pixels = torch.frombuffer(bytearray(data[16:16 + count * rows * cols]), dtype=torch.uint8)
    return pixels.view(count, 1, rows, cols)


def resize_once(images, size):
    """Shorter side to `size` (bilinear), centre crop: uint8 [N, C, size, size]."""
    out = []
    for chunk in images.split(1024):
        h, w = chunk.shape[-2:]
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        resized = F.interpolate(chunk.float(), size=(nh, nw), mode="bilinear",
                                align_corners=False, antialias=True)
        top, left = (nh - size) // 2, (nw - size) // 2
        out.append(resized[..., top:top + size, left:left + size].round().clamp(0, 255)
                   .to(torch.uint8))
    return torch.cat(out)


def permutation_set(grid, count, seed):
    """Greedy maximal-minimum-Hamming-distance permutations of grid*grid tiles."""
    tiles = grid * grid
    generator = torch.Generator().manual_seed(seed)
    if math.factorial(tiles) <= 400_000:
        candidates = torch.tensor(list(itertools.permutations(range(tiles))), dtype=torch.uint8)
    else:
        candidates = torch.stack([torch.randperm(tiles, generator=generator)
                                  for _ in range(400_000)]).to(torch.uint8)
    count = min(count, len(candidates))
    min_distance = torch.full((len(candidates),), 255, dtype=torch.int32)
    chosen = []
    pick = int(torch.randint(len(candidates), (1,), generator=generator))
    while len(chosen) < count:
        chosen.append(candidates[pick].long())
        distance = (candidates != candidates[pick]).sum(1, dtype=torch.int32)
        min_distance = torch.minimum(min_distance, distance)
        best = min_distance.max()
        ties = (min_distance == best).nonzero().flatten()
        pick = int(ties[torch.randint(len(ties), (1,), generator=generator)])
    return torch.stack(chosen)


class JigsawPuzzles(Dataset):
    """One puzzle per image: tiles [T, C, t, t] in permuted order, and the
    permutation's index."""

    def __init__(self, images, permutations, grid, tile_size, grey_p, jitter):
        self.images = images
        self.permutations = permutations
        self.grid, self.tile_size = grid, tile_size
        self.grey_p, self.jitter = grey_p, jitter

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index].float() / 255.0
        channels, side = image.shape[0], image.shape[-1]
        cell = side // self.grid
        crop, t = cell * self.grid, self.tile_size
        oy, ox = random.randint(0, side - crop), random.randint(0, side - crop)
        tiles = []
        for k in range(self.grid * self.grid):
            row, col = divmod(k, self.grid)
            y = oy + row * cell + random.randint(0, cell - t)
            x = ox + col * cell + random.randint(0, cell - t)
            tiles.append(image[:, y:y + t, x:x + t])
        label = random.randrange(len(self.permutations))
        tiles = torch.stack([tiles[k] for k in self.permutations[label]])
        if channels == 3:
            if random.random() < self.grey_p:
                tiles = tiles.mean(1, keepdim=True).expand_as(tiles)
            else:
                scale = 1 + (torch.rand(3) * 2 - 1) * self.jitter
                shift = (torch.rand(3) * 2 - 1) * self.jitter
                tiles = tiles * scale.view(1, 3, 1, 1) + shift.view(1, 3, 1, 1)
        mean = tiles.mean(dim=(1, 2, 3), keepdim=True)
        std = tiles.std(dim=(1, 2, 3), keepdim=True, correction=0)
        return (tiles - mean) / (std + 1e-3), label


def worker_init(worker_id):
    seed = torch.initial_seed() % 2**32
    random.seed(seed)


class ConvNet(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        widths = [32, 64, 128, 256]
        self.blocks = nn.ModuleList()
        c_in = in_channels
        for c_out in widths:
            self.blocks.append(nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)))
            c_in = c_out

    def forward(self, x):
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in (1, 2) and x.shape[2] >= 4:
                x = F.max_pool2d(x, 2)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class ContextFreeNetwork(nn.Module):
    def __init__(self, in_channels, tiles, permutations):
        super().__init__()
        self.tiles = tiles
        self.trunk = ConvNet(in_channels)
        self.tile_fc = nn.Linear(256, 512)
        self.joint_fc = nn.Linear(512 * tiles, 1024)
        self.classifier = nn.Linear(1024, permutations)

    def forward(self, tiles):
        b = tiles.shape[0]
        features = self.trunk(tiles.flatten(0, 1))
        per_tile = F.relu(self.tile_fc(features)).view(b, -1)
        joint = F.dropout(F.relu(self.joint_fc(per_tile)), 0.5, self.training)
        return self.classifier(joint)


def cosine_learning_rate(base, step, total):
    warmup = min(max(total // 20, 0), 200)
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--grid", type=int, default=3)
    parser.add_argument("--tile-size", type=int, default=18)
    parser.add_argument("--num-permutations", type=int, default=100)
    parser.add_argument("--permutation-seed", type=int, default=1)
    parser.add_argument("--grayscale-probability", type=float, default=0.3)
    parser.add_argument("--channel-jitter", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup-steps", type=int, default=10,
                        help="steps left out of the throughput (start-up, first allocations)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workers", type=int, default=1,
                        help="DataLoader worker processes (default 1: two cores, one "
                             "busy with the model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    started = time.time()
    images = resize_once(read_idx_images(DATASET, args.images), args.image_size)
    permutations = permutation_set(args.grid, args.num_permutations, args.permutation_seed)
    dataset = JigsawPuzzles(images, permutations, args.grid, args.tile_size,
                            args.grayscale_probability, args.channel_jitter)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0,
                        worker_init_fn=worker_init)
    model = ContextFreeNetwork(images.shape[1], args.grid * args.grid, len(permutations))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    print(f"data and model ready in {time.time() - started:.1f} s "
          f"({len(images)} images, {args.threads} threads, {args.workers} workers)", flush=True)

    model.train()
    step, measured_from, losses = 0, None, []
    waits, computes = [], []
    while step < args.steps:
        step_end = time.time()
        for tiles, labels in loader:
            got_batch = time.time()
            for group in optimizer.param_groups:
                group["lr"] = cosine_learning_rate(args.learning_rate, step, args.steps)
            loss = F.cross_entropy(model(tiles), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if step > args.warmup_steps:
                waits.append(got_batch - step_end)
                computes.append(time.time() - got_batch)
            step_end = time.time()
            if step == args.warmup_steps:
                measured_from = time.time()
            if step % 10 == 0:
                print(f"step {step} loss {sum(losses[-10:]) / 10:.4f}", flush=True)
            if step == args.steps:
                break
    elapsed = time.time() - measured_from
    measured = (args.steps - args.warmup_steps) * args.batch_size
    print(json.dumps({
        "images_per_second": measured / elapsed,
        "measured_images": measured,
        "measured_seconds": elapsed,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "threads": args.threads,
        "workers": args.workers,
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "batch_wait_ms": 1e3 * sum(waits) / len(waits),
        "step_compute_ms": 1e3 * sum(computes) / len(computes),
    }))


if __name__ == "__main__":
    main()
