"""Make the tiny CLIP of examples/task-merge-clip.toml: two small towers trained contrastively on MNIST digits.

Writes ``OUT`` (default ``runs/tiny-clip/tiny-clip.pt``): the whole CLIP's state dict
(``torch.save(clip.state_dict(), OUT)``, image and text towers), what the
``open-clip-image`` architecture reads as ``pretrained``. Run it once from the
repository root, then the example::

    python examples/make-tiny-clip.py
    mergescope run examples/task-merge-clip.toml --out runs/task-merge-clip

The CLIP is open_clip's ``CLIP`` with the config :data:`CONFIG` (a two-layer ViT of width
32 on 16x16 images cut into 4x4 patches, a one-layer text transformer of width 32, a
32-d joint space). It is trained on the train split of ``mnist5000`` (200 images per
digit, the split the pipeline's fine-tunes draw from) against the captions
``"a photo of the digit k."``: each batch of 64 images is scored against the ten
captions, every caption once, with CLIP's image-to-text cross-entropy

    loss = CE( exp(s) * <f(x)/||f(x)||, g(t_k)/||g(t_k)||>_k , label )

for ``steps`` Adam steps, the learning rates falling linearly to zero. The text tower is held
fixed for the first 40 steps: trained from the first step, the ten captions (which
differ in one token) are pulled onto one embedding within a few steps (every logit
equal, the loss at log 10), a saddle the towers do not leave; once the image tower
separates the digits, the text tower follows and spreads the captions apart. The run is
deterministic (seeded initialisation and batch order) and takes about half a minute on
one thread of a busy two-core machine; the zero-shot accuracy on the ten digits of the
test split is printed. The script trains for 100 steps by default, which leaves the
zero-shot accuracy near one half, as the real CLIP ViT-B/32's is on average over the
eight tasks of the benchmark, so the fine-tunes have room to gain; the tests train
:func:`train_tiny_clip` for its default 300 steps, which reach above 0.8.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

#: open_clip's model config of the tiny CLIP (the pipeline's ``config`` table).
CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 4},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
#: The caption of digit k, also the template of the zero-shot heads.
TEMPLATE = "a photo of the digit {}."
DIGITS = [str(d) for d in range(10)]
#: The mnist5000 options of the images (as the pipeline's [data] tables give them).
DIGIT_OPTIONS: dict[str, Any] = {"validation_fraction": 0.1, "image_size": 16, "rgb": True}


def digits(split: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(n, 3, 16, 16)`` and labels of ``per_class`` digits of each class of a mnist5000 split."""
    from mergescope import Data

    data = Data("mnist5000", split=split, per_class=per_class, **DIGIT_OPTIONS).load()
    images = torch.stack([data[i][0] for i in range(len(data))])
    return images, torch.as_tensor(np.asarray(data.labels))


def train_tiny_clip(
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 300,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 5e-3,
    text_lr: float = 1e-3,
    text_after: int = 40,
) -> nn.Module:
    """An open_clip CLIP of :data:`CONFIG` trained contrastively on ``images`` of digits ``labels``.

    Parameters
    ----------
    images, labels
        Training images at the config's size and their digits (0-9).
    steps
        Adam steps; every learning rate falls linearly to zero over them.
    seed
        Seeds the initialisation and the batch order (the global generator is left as it was).
    batch_size
        Images per step, each scored against the ten captions.
    lr
        The image tower's and the logit scale's learning rate.
    text_lr
        The text tower's learning rate.
    text_after
        Steps before the text tower starts to learn.
    """
    import open_clip

    tokenizer = open_clip.SimpleTokenizer(context_length=CONFIG["text_cfg"]["context_length"])
    captions = tokenizer([TEMPLATE.format(d) for d in DIGITS])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = open_clip.CLIP(**copy.deepcopy(CONFIG))
    text = [p for n, p in clip.named_parameters() if not n.startswith("visual.") and n != "logit_scale"]
    optimizer = torch.optim.Adam(
        [{"params": [*clip.visual.parameters(), clip.logit_scale], "lr": lr}, {"params": text, "lr": text_lr}]
    )

    def decay(step: int) -> float:
        return 1.0 - step / steps

    # The text tower waits until the image tower tells the digits apart (see the module docstring).
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [decay, lambda step: decay(step) * (step >= text_after)])
    order = torch.Generator().manual_seed(seed)
    clip.train()
    for _ in range(steps):
        batch = torch.randint(len(images), (batch_size,), generator=order)
        image = nn.functional.normalize(clip.encode_image(images[batch]), dim=-1)
        caption = nn.functional.normalize(clip.encode_text(captions), dim=-1)
        loss = nn.functional.cross_entropy(clip.logit_scale.exp() * image @ caption.t(), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return clip.eval()


def zero_shot_accuracy(clip: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of ``images`` whose nearest caption is their digit's."""
    import open_clip

    captions = open_clip.SimpleTokenizer(context_length=CONFIG["text_cfg"]["context_length"])(
        [TEMPLATE.format(d) for d in DIGITS]
    )
    with torch.no_grad():
        image = nn.functional.normalize(clip.encode_image(images), dim=-1)
        caption = nn.functional.normalize(clip.encode_text(captions), dim=-1)
        return float(((image @ caption.t()).argmax(dim=1) == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="runs/tiny-clip/tiny-clip.pt", help="where the state dict goes")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny towers: one thread is as fast, and deterministic
    images, labels = digits("train", per_class=200)
    start = time.perf_counter()
    clip = train_tiny_clip(images, labels, steps=args.steps, seed=args.seed)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(clip.state_dict(), out)
    accuracy = zero_shot_accuracy(clip, *digits("test", per_class=100))
    print(f"{out}: trained in {seconds:.1f} s; zero-shot accuracy on the ten test digits {accuracy:.3f}")


if __name__ == "__main__":
    main()
