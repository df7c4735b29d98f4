"""The serving benchmark's reference: a pretext classifier served the way a
PyTorch user would serve it, with FastAPI + uvicorn in one process.

Usage: python bench/reference/serve_fastapi.py --weights W.safetensors
           --model MODEL.json --threads N [--port 8090] [--device cuda:0]

MODEL.json is the service's `GET /v1/models/{id}` answer; W is its
`GET /v1/models/{id}/weights` download (safetensors, torchvision names).
The network is torchvision's resnet18 (or resnet18_small), loaded strictly,
in eval mode, with `torch.set_num_threads(N)`. Preprocessing is the
service's (scripts/reproduce_in_pytorch.py's `to_chw_u8`, then /255, minus
mean, over std). `POST /v1/models/{id}/classify?top_k=5` takes the same
bodies as the service (one raw image, or multipart image parts) and answers
the same shape: `{"model_id", "predictions": [[{"label", "score"}]]}`. The
forward pass runs in the request handler, one request at a time, as in the
usual FastAPI + PyTorch example.
"""

import argparse
import io
import json
import os
import sys

import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
from reproduce_in_pytorch import build_network, to_chw_u8  # noqa: E402


def create_app(model, weights, threads, device):
    torch.set_num_threads(threads)
    net, head = build_network(model, load_file(weights))
    net, head = net.to(device), head.to(device)
    spec = model["input"]
    mean = torch.tensor(spec["mean"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec["std"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    classes = model["classes"]
    app = FastAPI()

    def preprocess(data):
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return to_chw_u8(image, spec["image_size"], spec["channels"])
        except Exception as err:  # noqa: BLE001 - any decoding failure is the client's
            raise HTTPException(422, f"the image could not be used: {err}") from err

    @app.post("/v1/models/{model_id}/classify")
    async def classify(model_id: str, request: Request, top_k: int = 5):
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            parts = [await part.read() for _, part in form.multi_items() if hasattr(part, "read")]
        else:
            parts = [await request.body()]
        batch = torch.stack([preprocess(p) for p in parts]).to(device, torch.float32) / 255.0
        with torch.inference_mode():
            probabilities = head(net((batch - mean) / std)).softmax(-1)
        scores, indices = probabilities.topk(min(top_k, len(classes)), dim=-1)
        predictions = [
            [{"label": classes[i], "score": s} for s, i in zip(row_s, row_i)]
            for row_s, row_i in zip(scores.tolist(), indices.tolist())
        ]
        return JSONResponse({"model_id": model["id"], "predictions": predictions})

    return app


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--model", required=True, help="the model's JSON from GET /v1/models/{id}")
    parser.add_argument("--threads", type=int, required=True, help="torch intra-op threads")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    args = parser.parse_args()
    with open(args.model) as f:
        model = json.load(f)
    app = create_app(model, args.weights, args.threads, torch.device(args.device))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
