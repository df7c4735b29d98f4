"""Writes the fuzz targets' seed corpus into tests/fuzz/corpus/: small valid
inputs of every kind each parser accepts, which the fuzzers then mutate.
Run with the project's Python (Pillow comes with torchvision):
    .venv/bin/python tests/fuzz/make_corpus.py
"""

import io
import json
import tarfile
import zipfile
from pathlib import Path

from PIL import Image

CORPUS = Path(__file__).parent / "corpus"


def image(mode, size, colour):
    img = Image.new(mode, size, colour)
    for x in range(size[0]):
        img.putpixel((x, x % size[1]), (255, 255, 255) if mode == "RGB" else 255)
    return img


def encoded(img, fmt, **options):
    out = io.BytesIO()
    img.save(out, format=fmt, **options)
    return out.getvalue()


def write(target, name, data):
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def images():
    rgb = image("RGB", (8, 6), (200, 30, 60))
    grey = image("L", (5, 7), 90)
    return {
        "rgb.png": encoded(rgb, "PNG"),
        "grey.png": encoded(grey, "PNG"),
        "rgb.jpg": encoded(rgb, "JPEG", quality=80),
        "grey.jpg": encoded(grey, "JPEG"),
        "rgb.gif": encoded(rgb, "GIF"),
        "rgb.bmp": encoded(rgb, "BMP"),
        "rgb.webp": encoded(rgb, "WEBP"),
        "rgb.tiff": encoded(rgb, "TIFF"),
        "grey16.png": encoded(image("I;16", (4, 4), 1000), "PNG"),
        "rgba.png": encoded(image("RGBA", (3, 3), (1, 2, 3, 4)), "PNG"),
    }


def archives(pictures):
    entries = {
        "cat/a.png": pictures["rgb.png"],
        "dog/b.jpg": pictures["rgb.jpg"],
        "dog/c.png": pictures["grey.png"],
        "notes.txt": b"not an image",
    }
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    write("archive", "labelled.zip", out.getvalue())
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("flat.png", pictures["rgb.png"])
        archive.writestr("../escape.png", pictures["rgb.png"])
    write("archive", "stored.zip", out.getvalue())
    for mode, name in [("w", "labelled.tar"), ("w:gz", "labelled.tar.gz")]:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode=mode) as archive:
            for entry, data in entries.items():
                info = tarfile.TarInfo(entry)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            link = tarfile.TarInfo("cat/link.png")
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc/passwd"
            archive.addfile(link)
        write("archive", name, out.getvalue())


def labels():
    write("labels", "ids.csv", "image_id,label\n0,cat\n1,dog\n2,\n")
    write("labels", "paths.csv", "path,label\ncat/a.png,cat\n\"dog/b.jpg\",\"big, dog\"\n")
    write("labels", "bom.csv", "\ufeffimage_id,label\r\n3,bird\r\n")
    write(
        "labels",
        "ids.jsonl",
        "\n".join(
            json.dumps(row)
            for row in [{"image_id": 0, "label": "cat"}, {"path": "dog/c.png", "label": "dog"}, {"image_id": 1, "label": None}]
        )
        + "\n",
    )


def multipart(pictures):
    boundary = "fuzzboundary"
    parts = []
    for index, name in enumerate(["rgb.png", "grey.jpg"]):
        parts.append(
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image{index}\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n".encode()
            + pictures[name]
            + b"\r\n"
        )
    write("multipart", "two_images.bin", b"".join(parts) + f"--{boundary}--\r\n".encode())
    write(
        "multipart",
        "field_only.bin",
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n--{boundary}--\r\n".encode(),
    )


def configs():
    write("config", "pretrain.json", json.dumps({"pretext": "jigsaw", "epochs": 2, "batch_size": 16, "grid": 2}))
    write("config", "pretrain_simclr.json", json.dumps({"pretext": "simclr", "temperature": 0.2, "max_steps": 10}))
    write("config", "finetune.json", json.dumps({"transfer": "knn", "k": 20, "labels_per_class": 10}))
    write("config", "finetune_lr.json", json.dumps({"transfer": "fine_tune", "trunk_lr_scale": 0.1, "min_steps": 300}))
    write("config", "evaluate.json", json.dumps({"protocol": "label_efficiency", "labels_per_class": [10, 100], "transfers": ["linear", "knn"]}))


if __name__ == "__main__":
    pictures = images()
    for name, data in pictures.items():
        write("image", name, data)
    archives(pictures)
    labels()
    multipart(pictures)
    configs()
