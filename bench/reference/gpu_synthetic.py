#!/usr/bin/env python3
"""PyTorch eager on synthetic inputs already on the GPU: the ceilings that
pretext's GPU figures are compared with.

Two measurements, each printed as one JSON object on its own line:

- `train`: a jigsaw context-free network (torchvision's ResNet-18 as the
  per-tile trunk, its first convolution taking the data's channels; a
  per-tile fc of 512, concatenation, an fc of 1024 with dropout 0.5 and the
  permutation classifier, as in pretext) trained with AdamW on random tiles
  [B, T, C, t, t] and random labels, in fp32 and in bf16 autocast with
  channels-last; images/s between CUDA synchronisations, after warm-up steps.
- `inference`: a ResNet-18 classifier in eval mode under bf16 autocast,
  channels-last, at batch 1 and a large batch, on random images.

No data loading, no host-device copies: these are the kernels alone.
"""

import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


def resnet18_trunk(in_channels):
    trunk = torchvision.models.resnet18(num_classes=1000)
    if in_channels != 3:
        trunk.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    trunk.fc = nn.Identity()
    return trunk


class ContextFreeNetwork(nn.Module):
    def __init__(self, in_channels, tiles, permutations):
        super().__init__()
        self.tiles = tiles
        self.trunk = resnet18_trunk(in_channels)
        self.tile_fc = nn.Linear(512, 512)
        self.joint_fc = nn.Linear(512 * tiles, 1024)
        self.classifier = nn.Linear(1024, permutations)

    def forward(self, tiles):
        b = tiles.shape[0]
        features = self.trunk(tiles.flatten(0, 1))
        per_tile = F.relu(self.tile_fc(features)).view(b, -1)
        joint = F.dropout(F.relu(self.joint_fc(per_tile)), 0.5, self.training)
        return self.classifier(joint)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, step, warmup, steps):
    for _ in range(warmup):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return time.perf_counter() - started


def train(args, bf16):
    device = torch.device(args.device)
    tiles = args.grid * args.grid
    model = ContextFreeNetwork(args.channels, tiles, args.permutations).to(device)
    xs = torch.randn(args.batch_size, tiles, args.channels, args.tile_size, args.tile_size,
                     device=device)
    ys = torch.randint(args.permutations, (args.batch_size,), device=device)
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(xs), ys)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = timed(device, step, args.warmup_steps, args.steps)
    return {
        "measurement": "train",
        "precision": "bf16 autocast, channels-last" if bf16 else "fp32",
        "images_per_second": args.batch_size * args.steps / seconds,
        "batch_size": args.batch_size,
        "tiles": tiles,
        "tile_size": args.tile_size,
        "channels": args.channels,
        "steps": args.steps,
    }


def inference(args, batch_size):
    device = torch.device(args.device)
    model = torchvision.models.resnet18(num_classes=args.classes)
    if args.inference_channels != 3:
        model.conv1 = nn.Conv2d(args.inference_channels, 64, 7, 2, 3, bias=False)
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    xs = torch.randn(batch_size, args.inference_channels, args.inference_size,
                     args.inference_size, device=device).to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            model(xs).softmax(-1)

    steps = max(20, args.inference_images // batch_size)
    seconds = timed(device, step, 10, steps)
    return {
        "measurement": "inference",
        "precision": "bf16 autocast, channels-last",
        "images_per_second": batch_size * steps / seconds,
        "batch_size": batch_size,
        "image_size": args.inference_size,
        "channels": args.inference_channels,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--grid", type=int, default=3)
    parser.add_argument("--tile-size", type=int, default=64)
    parser.add_argument("--permutations", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup-steps", type=int, default=15)
    parser.add_argument("--inference-size", type=int, default=224)
    parser.add_argument("--inference-channels", type=int, default=3)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--inference-batch", type=int, default=64)
    parser.add_argument("--inference-images", type=int, default=20000)
    parser.add_argument("--device", default="cuda",
                        help="cuda (what it is for), or cpu to check the script itself")
    parser.add_argument("--no-cudnn-benchmark", action="store_true",
                        help="let cuDNN pick kernels by heuristics instead of timing them")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-inference", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu to check the script on a CPU")
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({"device": name, "torch": torch.__version__}), flush=True)
    if not args.skip_train:
        for bf16 in (False, True):
            print(json.dumps(train(args, bf16)), flush=True)
    if not args.skip_inference:
        for batch_size in (1, args.inference_batch):
            print(json.dumps(inference(args, batch_size)), flush=True)


if __name__ == "__main__":
    main()
