#!/usr/bin/env python3
"""Oracle for Gemma 4 image preprocessing (shared spec: multimodal §1.1).

Runs Hugging Face's `Gemma4ImageProcessorPil` (transformers 5.23.0, Pillow 13.0.0) on a set
of images at every supported budget, checks its output against Pillow's own bicubic resize,
and writes what the Rust reference (`gemma4_reference::vision::preprocessing`) is compared
with:

    <out>/images/<name>.<ext>          the source files, exactly as the Rust side reads them
    <out>/images/<name>.pil_rgb.png    every source that is not an 8-bit RGB PNG (alpha, palette,
                                       grey, 16-bit, JPEG, WebP, GIF): the RGB that HF's
                                       `convert_to_rgb` made of it, lossless, so a decoder
                                       difference can be located pixel by pixel and the resize
                                       checked without it (JPEG)
    <out>/tensors/<name>.safetensors   per budget B: `b{B}.pixel_values_head` and
                                       `b{B}.pixel_values_tail` (float32 [3, 768], the first and
                                       last 3 valid rows) and `b{B}.patch_sums` (uint32 [n]: per
                                       valid patch, sum over k < 768 of level[k]·(k + 1), to
                                       locate a difference the sha256 below only detects); for
                                       the images in FULL_TENSOR_IMAGES also
                                       `b70.pixel_values_levels` (uint8 [n, 768]) and
                                       `b70.positions` (int64 [n, 2])
    <out>/images/noise_*.png           the sources of `resize_cases` (see below)
    <out>/tensors/resize_cases.safetensors   `<source>.<W>x<H>`: Pillow's resized uint8 [H, W, 3]
    <out>/manifest.json                per image: licence, Pillow mode, size, sha256 of the RGB
                                       after HF's `convert_to_rgb`; per budget: resized size,
                                       whether the resize was skipped, soft tokens, sha256 of
                                       the resized uint8 RGB bytes, of pixel_values (valid rows,
                                       float32 little-endian) and of the positions (int64 LE)

Every stored pixel value is an exact float32 of `level * (1/255)`; the script asserts this, which
is why the whole `[n, 768]` tensor can be stored as uint8 levels. A sha256 of the float32 bytes
still pins the float conversion itself.

Besides HF, `resize_cases` records Pillow's resize of small noise images to many sizes, with the
pass order Pillow took (Pillow 13 runs the vertical pass first when the height shrinks by more
than twice as many pixels as the width does); noise makes every rounding visible.

`images/` and `tensors/` are emptied first: they hold this script's output only.

The output is deterministic: running the script twice gives byte-identical files. Run it with the
oracle virtualenv (golden/requirements.txt):

    python golden/vision_preprocessing.py golden/image_preprocessing

(`cargo xtask golden` runs it so, with the environment of golden/generate.py.)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import safetensors.numpy  # noqa: E402
import skimage.data  # noqa: E402
from PIL import Image  # noqa: E402
from transformers.image_transforms import convert_to_rgb  # noqa: E402
from transformers.models.gemma4.image_processing_pil_gemma4 import (  # noqa: E402
    Gemma4ImageProcessorPil,
    get_aspect_ratio_preserving_size,
)

BUDGETS = (70, 140, 280, 560, 1120)
PATCH = 16
SEED = 20260407
# Images whose whole budget-70 pixel_values and positions are stored (each costs about 0.4 MB).
FULL_TENSOR_IMAGES = ("astronaut", "rgba_alpha_ramp")

# Licences as scikit-image documents them (skimage/data/_fetchers.py).
PHOTO_LICENCES = {
    "astronaut": "Eileen Collins, NASA Great Images database: no known copyright restrictions, public domain",
    "coffee": "courtesy of Pikolo Espresso Bar; CC0 by the photographer (Rachel Michetti)",
    "chelsea": "CC0 by the photographer (Stefan van der Walt)",
    "rocket": "launch of DSCOVR on Falcon 9, captured by SpaceX and released into the public domain",
}
# Photographs are shrunk (Pillow LANCZOS) to keep the fixtures small; sizes are chosen so that no
# budget fits them exactly (every budget resizes, mostly up).
PHOTO_SIZES = {"astronaut": (256, 256), "coffee": (300, 200), "chelsea": (226, 150), "rocket": (160, 240)}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=9)
    return buffer.getvalue()


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# Source images
# ------------------------------------------------------------------------------------------------


def structured_rgb(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Sharp-edged stripes, checkers and ramps (compress well, and make bicubic overshoot and
    clip), plus one patch of noise. [height, width, 3] uint8."""
    y, x = np.mgrid[0:height, 0:width]
    r = ((x // 7 + y // 5) % 2) * 230 + 10
    g = (x * 255 // max(width - 1, 1)).astype(np.int64)
    b = np.where(((x // 3) % 4 == 0) | ((y // 11) % 3 == 0), 250, 20)
    image = np.stack([r, g, b], axis=-1).astype(np.uint8)
    ph, pw = min(40, height), min(40, width)
    image[:ph, :pw] = rng.integers(0, 256, (ph, pw, 3), dtype=np.uint8)
    return image


def source_images(rng: np.random.Generator) -> list[dict]:
    """Every source image: name, file bytes, extension, licence and what it exercises."""
    images = []
    for name, size in PHOTO_SIZES.items():
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        photo = photo.resize(size, Image.Resampling.LANCZOS)
        images.append(dict(name=name, ext="png", data=png_bytes(photo), licence=PHOTO_LICENCES[name],
                           exercises="photograph, PNG (RGB)"))
        if name == "astronaut":
            images.append(dict(name="astronaut_jpeg", ext="jpg", data=encoded(photo, "JPEG", quality=90),
                               licence=PHOTO_LICENCES[name], exercises="JPEG quality 90 (4:2:0): decoder difference"))
            images.append(dict(name="astronaut_webp", ext="webp", data=encoded(photo, "WEBP", quality=90, method=4),
                               licence=PHOTO_LICENCES[name], exercises="lossy WebP quality 90: decoder difference"))
            gif = photo.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            gif.info["transparency"] = int(np.asarray(gif)[0, 0])
            images.append(dict(name="astronaut_gif", ext="gif", data=encoded(gif, "GIF", transparency=gif.info["transparency"]),
                               licence=PHOTO_LICENCES[name],
                               exercises="GIF, palette with a transparent index (composited over white)"))

    synthetic = "synthetic, generated by this script (no licence needed)"
    images.append(dict(name="wide_2000x300", ext="png", data=png_bytes(Image.fromarray(structured_rgb(2000, 300, rng))),
                       licence=synthetic, exercises="very wide: downscale, H' rounds low"))
    images.append(dict(name="tall_300x2000", ext="png", data=png_bytes(Image.fromarray(structured_rgb(300, 2000, rng))),
                       licence=synthetic, exercises="very tall: Pillow 13 resizes vertically first"))
    images.append(dict(name="tiny_20x20", ext="png",
                       data=png_bytes(Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))),
                       licence=synthetic, exercises="tiny noise image: large up-scale"))
    images.append(dict(name="exact_768x768", ext="png", data=png_bytes(Image.fromarray(structured_rgb(768, 768, rng))),
                       licence=synthetic, exercises="768x768 fits B=280 exactly: the resize is skipped"))

    # RGBA: R runs over every level along x and alpha over every level along y, so every
    # (colour, alpha) pair of the red channel is composited once.
    y, x = np.mgrid[0:256, 0:256]
    rgba = np.stack([x, 255 - x, (x * 7 + y * 3) % 256, y], axis=-1).astype(np.uint8)
    images.append(dict(name="rgba_alpha_ramp", ext="png", data=png_bytes(Image.fromarray(rgba, "RGBA")),
                       licence=synthetic, exercises="RGBA, every alpha level: composited over white"))

    y, x = np.mgrid[0:96, 0:128]
    la = np.stack([(x * 2) % 256, (y * 255 // 95)], axis=-1).astype(np.uint8)
    images.append(dict(name="la_ramp", ext="png", data=png_bytes(Image.fromarray(la, "LA")),
                       licence=synthetic, exercises="LA (grey + alpha): composited over white"))

    palette_image = Image.fromarray(((x // 8 + y // 8) % 16).astype(np.uint8), "P")
    palette_image.putpalette([v for i in range(16) for v in ((i * 37) % 256, (i * 91) % 256, (255 - i * 16) % 256)])
    alphas = bytes([0, 255, 128, 64, 255, 200, 10, 255, 255, 90, 255, 30, 255, 255, 180, 255])
    images.append(dict(name="palette_transparency", ext="png", data=encoded(palette_image, "PNG", transparency=alphas),
                       licence=synthetic, exercises="palette (P) with a tRNS alpha per entry"))

    grey = ((x[:, :, None] * 2 + y[:, :, None]) % 256).astype(np.uint8)[:, :, 0]
    images.append(dict(name="grey", ext="png", data=png_bytes(Image.fromarray(grey, "L")),
                       licence=synthetic, exercises="greyscale (L)"))

    y16, x16 = np.mgrid[0:150, 0:200]
    grey16 = (x16 * 3 + y16 * 150).astype(np.uint16)  # 0..22947: most values above 255
    grey16[:20, :] = (x16[:20, :] * 255 // 199).astype(np.uint16)  # a band below 256
    images.append(dict(name="grey16", ext="png", data=png_bytes(Image.fromarray(grey16)),
                       licence=synthetic,
                       exercises="16-bit greyscale (Pillow mode I;16): Pillow clips to 255, it does not scale"))
    return images


# ------------------------------------------------------------------------------------------------
# The oracle
# ------------------------------------------------------------------------------------------------


def pass_order(source: Image.Image, width: int, height: int) -> str:
    """Which pass Pillow ran first, found by comparing with two single-axis resizes."""
    if width == source.width or height == source.height:
        return "one_pass"
    direct = np.asarray(source.resize((width, height), Image.Resampling.BICUBIC))
    horizontal = np.asarray(source.resize((width, source.height), Image.Resampling.BICUBIC)
                            .resize((width, height), Image.Resampling.BICUBIC))
    vertical = np.asarray(source.resize((source.width, height), Image.Resampling.BICUBIC)
                          .resize((width, height), Image.Resampling.BICUBIC))
    h, v = np.array_equal(direct, horizontal), np.array_equal(direct, vertical)
    if h and v:
        return "either"
    if h:
        return "horizontal_first"
    if v:
        return "vertical_first"
    raise AssertionError(f"Pillow's resize to {width}x{height} matches neither pass order")


def run_budget(pil_image: Image.Image, rgb: np.ndarray, budget: int) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """HF's processor at one budget, checked against Pillow's own resize: the manifest record,
    the head/tail tensors, and the uint8 levels [n, 768] and positions [n, 2] of the valid patches."""
    processor = Gemma4ImageProcessorPil(max_soft_tokens=budget)
    out = processor(images=[pil_image], return_tensors="np")
    pixel_values = np.asarray(out["pixel_values"][0], dtype=np.float32)  # [9B, 768]
    positions = np.asarray(out["image_position_ids"][0]).astype(np.int64)  # [9B, 2]
    soft_tokens = int(np.asarray(out["num_soft_tokens_per_image"]).reshape(-1)[0])
    valid = positions[:, 0] >= 0
    n = int(valid.sum())
    assert valid[:n].all() and not valid[n:].any(), "padding must follow the valid patches"
    pixel_values, positions = pixel_values[:n], positions[:n]

    height, width = rgb.shape[:2]
    resized_h, resized_w = get_aspect_ratio_preserving_size(height, width, PATCH, 9 * budget, 3)
    grid_h, grid_w = resized_h // PATCH, resized_w // PATCH
    assert n == grid_h * grid_w and soft_tokens == n // 9

    # Every value is exactly float32(level * (1/255)).
    levels = np.rint(pixel_values.astype(np.float64) * 255).astype(np.uint8)
    assert np.array_equal((levels.astype(np.float64) * (1 / 255)).astype(np.float32), pixel_values)

    # Undo the patch order ([gh, gw, 16, 16, 3] -> [H', W', 3]) and compare with Pillow.
    resized = levels.reshape(grid_h, grid_w, PATCH, PATCH, 3).transpose(0, 2, 1, 3, 4)
    resized = resized.reshape(resized_h, resized_w, 3)
    skipped = (resized_h, resized_w) == (height, width)
    source = Image.fromarray(rgb)
    pil = rgb if skipped else np.asarray(source.resize((resized_w, resized_h), Image.Resampling.BICUBIC))
    assert np.array_equal(pil, resized), "HF's resized pixels differ from Pillow's resize"

    grid_y, grid_x = np.divmod(np.arange(n), grid_w)
    assert np.array_equal(positions, np.stack([grid_x, grid_y], axis=-1)), "positions are (x, y) row-major"

    record = {
        "budget": budget,
        "resized_height": resized_h,
        "resized_width": resized_w,
        "resize_skipped": skipped,
        "pass_order": "skipped" if skipped else pass_order(source, resized_w, resized_h),
        "num_patches": n,
        "soft_tokens": soft_tokens,
        "resized_rgb_sha256": sha256(np.ascontiguousarray(resized).tobytes()),
        "pixel_values_sha256": sha256(pixel_values.astype("<f4").tobytes()),
        "positions_sha256": sha256(positions.astype("<i8").tobytes()),
    }
    tensors = {
        f"b{budget}.pixel_values_head": np.ascontiguousarray(pixel_values[:3]),
        f"b{budget}.pixel_values_tail": np.ascontiguousarray(pixel_values[-3:]),
        f"b{budget}.patch_sums": patch_sums(levels),
    }
    return record, tensors, levels, positions


def patch_sums(levels: np.ndarray) -> np.ndarray:
    """Per patch, sum over k of level[k]·(k + 1) (uint32 [n]; at most 255·768·769/2 < 2^32)."""
    weights = np.arange(1, levels.shape[1] + 1, dtype=np.uint64)
    return np.ascontiguousarray((levels.astype(np.uint64) @ weights).astype(np.uint32))


def resize_cases(rng: np.random.Generator, images_dir: Path) -> tuple[list[dict], dict]:
    """Pillow's bicubic resize of noise images to sizes that take every path: each pass alone,
    both orders, up- and down-scaling, extreme factors. Returns the manifest records and the
    resized images (`<source>.<W>x<H>`, uint8 [H, W, 3])."""
    sources = {
        "noise_61x47": rng.integers(0, 256, (47, 61, 3), dtype=np.uint8),
        "noise_23x150": rng.integers(0, 256, (150, 23, 3), dtype=np.uint8),
    }
    targets = [(30, 20), (61, 20), (30, 47), (120, 90), (200, 13), (5, 100), (60, 46), (62, 48), (1, 1),
               (7, 3), (23, 40), (20, 150), (48, 96), (10, 60), (96, 48), (3, 149), (200, 300), (46, 20)]
    cases = []
    resized_images = {}
    for name, array in sources.items():
        (images_dir / f"{name}.png").write_bytes(png_bytes(Image.fromarray(array)))
        source = Image.fromarray(array)
        for width, height in targets:
            resized = np.asarray(source.resize((width, height), Image.Resampling.BICUBIC))
            resized_images[f"{name}.{width}x{height}"] = np.ascontiguousarray(resized)
            cases.append({
                "source": f"images/{name}.png",
                "width": width,
                "height": height,
                "pass_order": pass_order(source, width, height),
                "resized_rgb_sha256": sha256(np.ascontiguousarray(resized).tobytes()),
            })
    return cases, resized_images


def write_fixtures(out_dir: Path) -> None:
    """Writes the source images, the per-image tensors and manifest.json into `out_dir`."""
    out_dir = Path(out_dir)
    images_dir, tensors_dir = out_dir / "images", out_dir / "tensors"
    for folder in (images_dir, tensors_dir):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in sorted(folder.iterdir()):  # everything in them is rewritten below
            stale.unlink()
    rng = np.random.default_rng(SEED)

    entries = []
    for source in source_images(rng):
        path = images_dir / f"{source['name']}.{source['ext']}"
        path.write_bytes(source["data"])
        pil_image = Image.open(path)  # what a user hands the processor
        mode = pil_image.mode
        rgb = convert_to_rgb(pil_image, return_numpy=True)
        entry = {
            "name": source["name"],
            "file": f"images/{path.name}",
            "file_sha256": sha256(source["data"]),
            "licence": source["licence"],
            "exercises": source["exercises"],
            "pil_mode": mode,
            "pil_transparency": "transparency" in pil_image.info,
            "width": pil_image.width,
            "height": pil_image.height,
            "rgb_sha256": sha256(np.ascontiguousarray(rgb).tobytes()),
            "budgets": [],
        }
        if source["ext"] != "png" or mode != "RGB":
            converted = images_dir / f"{source['name']}.pil_rgb.png"
            converted.write_bytes(png_bytes(Image.fromarray(rgb)))
            assert np.array_equal(np.asarray(Image.open(converted)), rgb)
            entry["pil_rgb_file"] = f"images/{converted.name}"
        tensors = {}
        for budget in BUDGETS:
            record, budget_tensors, levels, positions = run_budget(Image.open(path), rgb, budget)
            entry["budgets"].append(record)
            tensors.update(budget_tensors)
            if budget == 70 and source["name"] in FULL_TENSOR_IMAGES:
                tensors["b70.pixel_values_levels"] = np.ascontiguousarray(levels)
                tensors["b70.positions"] = np.ascontiguousarray(positions)
        safetensors.numpy.save_file(tensors, str(tensors_dir / f"{source['name']}.safetensors"))
        entries.append(entry)

    cases, resized_images = resize_cases(rng, images_dir)
    safetensors.numpy.save_file(resized_images, str(tensors_dir / "resize_cases.safetensors"))
    manifest = {
        "generator": "golden/vision_preprocessing.py",
        "spec": "shared spec: multimodal §1.1",
        "versions": {
            package: importlib.metadata.version(package)
            for package in ("transformers", "pillow", "numpy", "scikit-image", "safetensors")
        },
        "seed": SEED,
        "budgets": list(BUDGETS),
        "images": entries,
        "resize_cases": cases,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory to write the fixtures into")
    args = parser.parse_args(argv)
    write_fixtures(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
