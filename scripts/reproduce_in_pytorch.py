"""Reproduce a pretext model's outputs in PyTorch and compare them with the service's.

Usage: python scripts/reproduce_in_pytorch.py --url URL --model ID IMAGE [--classify]
       [--api-key KEY]   (default: $PRETEXT_API_KEY)

Downloads the model (GET /v1/models/{id}) and its weights
(GET /v1/models/{id}/weights, safetensors), builds torchvision's resnet18
(with fc = Identity, so that its output is the embedding; a classifier's fc
is kept aside to turn the embedding into class scores), loads the weights
strictly, preprocesses IMAGE as the service does and runs the network in
eval mode. Then it asks the service for the same image's embedding (/embed)
and, with --classify, class scores (/classify), prints the largest absolute
difference of each, and exits 1 when one is above 1e-4.

Preprocessing follows src/data/decode.rs (`to_chw_u8`): the centre square
is cropped, then resized to the model's image_size, the pixels are laid out CHW as uint8 (grey: the image crate's integer sRGB luma),
then divided by 255, the model's mean subtracted and the result divided by
its std. The resize is only exact when IMAGE already is image_size x
image_size pixels (then nothing is resized): otherwise PIL's bilinear
filter stands in for the image crate's triangle filter, the pixels differ
slightly, and so may the outputs. Use an image of the model's size for an
exact check.

Backbones: resnet18 and resnet18_small (a 3x3 stride-1 stem without
max-pool); convnet has no torchvision counterpart. Exits 2 on a usage error.
"""

import argparse
import json
import os
import sys
import urllib.error
import urllib.request

import torch
import torchvision
from PIL import Image
from safetensors.torch import load as load_safetensors
from torchvision.transforms.functional import pil_to_tensor

TOLERANCE = 1e-4


class UsageError(Exception):
    """The model or image cannot be checked this way."""


def fetch(url, api_key, body=None):
    """GET (or POST `body` as a raw image) and return the response bytes."""
    request = urllib.request.Request(url, data=body)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    if body is not None:
        request.add_header("Content-Type", "application/octet-stream")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        detail = err.read().decode("utf-8", "replace")
        raise UsageError(f"{request.get_method()} {url} answered {err.code}: {detail}") from err


def build_network(model, state):
    """torchvision's resnet18 shaped like the model, its weights loaded strictly.

    Returns (network whose output is the embedding, classification head or None).
    """
    backbone = model["backbone"]
    if backbone not in ("resnet18", "resnet18_small"):
        raise UsageError(f"backbone {backbone} has no torchvision counterpart; use resnet18")
    classifier = model["kind"] == "classifier"
    net = torchvision.models.resnet18(
        weights=None, num_classes=len(model["classes"]) if classifier else 1000
    )
    channels = model["input"]["channels"]
    if backbone == "resnet18_small":
        net.conv1 = torch.nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = torch.nn.Identity()
    elif channels != 3:
        net.conv1 = torch.nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if not classifier:
        net.fc = torch.nn.Identity()  # an encoder's file has no fc.*
    net.load_state_dict(state, strict=True)
    head = None
    if classifier:
        head, net.fc = net.fc, torch.nn.Identity()
        head.eval()
    return net.eval(), head


def to_chw_u8(image, size, channels):
    """The service's `to_chw_u8`: centre square crop, resize, CHW uint8."""
    width, height = max(image.width, 1), max(image.height, 1)
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        print(
            f"warning: the image is {width}x{height}, not {size}x{size}; the resize only "
            "approximates the service's, so outputs may differ",
            file=sys.stderr,
        )
        image = image.resize((size, size), Image.BILINEAR)
    if channels == 1:
        if image.mode in ("L", "LA"):
            return pil_to_tensor(image.getchannel("L"))
        rgb = pil_to_tensor(image.convert("RGB")).to(torch.int64)
        luma = (2126 * rgb[0] + 7152 * rgb[1] + 722 * rgb[2]) // 10000
        return luma.to(torch.uint8).unsqueeze(0)
    return pil_to_tensor(image.convert("RGB"))


def preprocess(path, spec):
    """A `[1, C, S, S]` float batch normalised with the model's mean and std."""
    with Image.open(path) as image:
        image.load()
        pixels = to_chw_u8(image, spec["image_size"], spec["channels"])
    mean = torch.tensor(spec["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return (pixels.unsqueeze(0).to(torch.float32) / 255.0 - mean) / std


def max_difference(ours, theirs):
    theirs = torch.tensor(theirs, dtype=torch.float32)
    if ours.shape != theirs.shape:
        raise UsageError(f"shapes differ: {tuple(ours.shape)} here, {tuple(theirs.shape)} served")
    return (ours - theirs).abs().max().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8080")
    parser.add_argument("--model", required=True, help="the model's id")
    parser.add_argument("image", help="an image file, ideally image_size x image_size pixels")
    parser.add_argument("--classify", action="store_true", help="also compare class scores")
    parser.add_argument("--api-key", default=os.environ.get("PRETEXT_API_KEY"),
                        help="API key (default: $PRETEXT_API_KEY)")
    args = parser.parse_args()
    base = args.url.rstrip("/") + f"/v1/models/{args.model}"

    try:
        model = json.loads(fetch(base, args.api_key))
        if args.classify and model["kind"] != "classifier":
            raise UsageError(f"model {args.model} is an encoder; --classify needs a classifier")
        if args.classify and (model.get("description") or {}).get("transfer") == "knn":
            raise UsageError(
                f"model {args.model} is a kNN classifier (no fc head to rebuild in torchvision); "
                "compare its embeddings without --classify"
            )
        net, head = build_network(model, load_safetensors(fetch(base + "/weights", args.api_key)))
        with open(args.image, "rb") as f:
            image_bytes = f.read()
        xs = preprocess(args.image, model["input"])

        with torch.no_grad():
            embedding = net(xs)[0]
            scores = torch.softmax(head(embedding.unsqueeze(0)), dim=-1)[0] if head else None

        served = json.loads(fetch(base + "/embed", args.api_key, image_bytes))
        differences = {"embedding": max_difference(embedding, served["embeddings"][0])}
        if args.classify:
            classes = model["classes"]
            answer = json.loads(fetch(f"{base}/classify?top_k={len(classes)}", args.api_key, image_bytes))
            by_label = {p["label"]: p["score"] for p in answer["predictions"][0]}
            differences["scores"] = max_difference(scores, [by_label[c] for c in classes])
    except (UsageError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    for name, difference in differences.items():
        print(f"{name}: max abs difference {difference:.3g}")
    worst = max(differences.values())
    if not worst <= TOLERANCE:
        print(f"outputs differ by {worst:.3g}, more than {TOLERANCE}", file=sys.stderr)
        return 1
    print(f"PyTorch reproduces the service within {TOLERANCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
