"""Check that a pretext weights file loads into torchvision's ResNet-18.

Usage: python scripts/load_in_torchvision.py WEIGHTS.safetensors [--num-classes K]

Loads the file downloaded from GET /v1/models/{id}/weights into
torchvision.models.resnet18(weights=None, num_classes=K or 1000) with
strict=False and prints {"missing_keys": [...], "unexpected_keys": [...]}
as JSON. Exits 0 when no key is unexpected and only fc.weight / fc.bias are
missing (an encoder); with --num-classes nothing may be missing (a
classifier). Exits 1 otherwise.
"""

import argparse
import json
import sys

import torchvision
from safetensors.torch import load_file

HEAD = {"fc.weight", "fc.bias"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", help="path to a .safetensors file")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classifier head size; requires fc.* in the file")
    args = parser.parse_args()

    state = load_file(args.weights)
    model = torchvision.models.resnet18(weights=None, num_classes=args.num_classes or 1000)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch, e.g. a classifier head without --num-classes
        print(f"weights do not fit torchvision resnet18: {err}", file=sys.stderr)
        return 1
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    print(json.dumps({"missing_keys": missing, "unexpected_keys": unexpected}))

    allowed = set() if args.num_classes is not None else HEAD
    problems = []
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    extra = [k for k in missing if k not in allowed]
    if extra:
        problems.append(f"missing keys: {', '.join(extra)}")
    if problems:
        print("weights do not match torchvision resnet18: " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
