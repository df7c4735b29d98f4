#!/usr/bin/env python3
"""PyTorch eager on the CPU: what memory layout and bfloat16 autocast do to
one training step of pretext's small-image backbone, `resnet10_narrow`
(a 3x3 stem at full resolution, one basic block per stage, widths 32-64-128-256),
on random 28-px grey images with a linear head, cross-entropy and AdamW
(foreach). Prints images/s (median step after warm-up) for NCHW and
channels-last, float32 and bfloat16 autocast, at each batch size, for a few
rounds so that a noisy machine shows as spread.

    .venv/bin/python bench/reference/cpu_precision.py --threads 2 --rounds 2
"""

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + shortcut)


class Resnet10Narrow(nn.Module):
    def __init__(self, widths=(32, 64, 128, 256), classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layers = nn.Sequential(
            Block(widths[0], widths[0], 1), Block(widths[0], widths[1], 2),
            Block(widths[1], widths[2], 2), Block(widths[2], widths[3], 2))
        self.fc = nn.Linear(widths[3], classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def images_per_second(channels_last, bf16, batch_size, steps, warmup, size):
    torch.manual_seed(0)
    model = Resnet10Narrow()
    xs = torch.randn(batch_size, 1, size, size)
    ys = torch.randint(0, 10, (batch_size,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        xs = xs.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3, foreach=True)
    times = []
    for _ in range(warmup + steps):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(xs).float(), ys)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    timed = sorted(times[warmup:])
    return batch_size / timed[len(timed) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-sizes", default="64,128")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=28)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    for r in range(args.rounds):
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            for channels_last, bf16 in ((False, False), (True, False), (False, True), (True, True)):
                rate = images_per_second(channels_last, bf16, batch_size, args.steps,
                                         args.warmup, args.image_size)
                layout = "channels-last" if channels_last else "NCHW"
                precision = "bf16 autocast" if bf16 else "float32"
                print(f"round {r + 1}, batch {batch_size}, {layout}, {precision}: "
                      f"{rate:.0f} images/s", flush=True)


if __name__ == "__main__":
    main()
