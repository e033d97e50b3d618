"""Draw a contact sheet of each procedural dataset (``dice``, ``critters``).

Writes ``docs/experiments/procedural-dice.png`` and ``docs/experiments/procedural-critters.png``:
the first 36 training images of each at 96 px, 6 x 6, with their class names.

    python examples/procedural-datasets-sheet.py [--out docs/experiments] [--size 96]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from mergescope_plugins.procedural import Critters, Dice


def contact_sheet(source, columns: int = 6, rows: int = 6) -> Image.Image:
    """The first ``columns * rows`` images of ``source``'s split, class name under each."""
    data = source.load()
    size, caption = source.image_size, 14
    sheet = Image.new("RGB", (columns * size, rows * (size + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for k in range(min(columns * rows, len(data))):
        x, y = (k % columns) * size, (k // columns) * (size + caption)
        sheet.paste(data.image(k), (x, y))
        draw.text((x + 3, y + size + 1), data.classes[int(data.labels[k])], fill="black")
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/experiments"))
    parser.add_argument("--size", type=int, default=96)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for cls in (Dice, Critters):
        path = args.out / f"procedural-{cls.name}.png"
        sheet = contact_sheet(cls(split="train", size=36, image_size=args.size))
        # A dithered 256-colour palette keeps the file small without banding the gradients.
        palette = sheet.quantize(256, method=Image.Quantize.MEDIANCUT)
        sheet.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(path, optimize=True)
        print(path)


if __name__ == "__main__":
    main()
