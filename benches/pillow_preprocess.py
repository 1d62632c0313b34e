"""Pillow baseline for benches/preprocess.sh: the same work as melanoflow's
preprocess (decode, resize the shorter side to SIZE with bicubic, centre crop)
in a multiprocessing pool with one worker per core. Prints JSON lines like
preprocess_throughput: {"work", "images", "seconds", "images_per_s"}.

usage: python pillow_preprocess.py DIR [SIZE=256] [REPEATS=3]
"""
import json
import os
import sys
import time
from multiprocessing import Pool

from PIL import Image

SIZE = int(sys.argv[2]) if len(sys.argv) > 2 else 256


def decode_only(path):
    with Image.open(path) as im:
        im.convert("RGB").load()


def decode_resize_crop(path):
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = SIZE / min(w, h)
        im = im.resize((max(SIZE, round(w * s)), max(SIZE, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - SIZE) // 2, (h - SIZE) // 2
        im.crop((left, top, left + SIZE, top + SIZE)).tobytes()


def draft_box(im):
    """Pillow's own fast path: `draft` picks the smallest DCT scale (1/2, 1/4,
    1/8) that keeps both sides at least as large as the shorter side needs,
    then one `resize` with `box` crops and resizes in a single pass (only the
    kept square is resampled). Returns the drafted image and the crop box."""
    w, h = im.size
    s = SIZE / min(w, h)
    im.draft("RGB", (max(1, round(w * s)), max(1, round(h * s))))
    im = im.convert("RGB")
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return im, (left, top, left + side, top + side)


def draft_decode_only(path):
    with Image.open(path) as im:
        im, _ = draft_box(im)
        im.load()


def draft_resize_crop(path):
    with Image.open(path) as im:
        im, box = draft_box(im)
        im.resize((SIZE, SIZE), Image.BICUBIC, box=box).tobytes()


def measure(pool, name, fn, files, repeats):
    pool.map(fn, files, chunksize=8)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        pool.map(fn, files, chunksize=8)
        best = min(best, time.perf_counter() - t)
    print(json.dumps({"work": name, "images": len(files), "workers": os.cpu_count(), "seconds": round(best, 4),
                      "images_per_s": round(len(files) / best, 1)}))


if __name__ == "__main__":
    folder = sys.argv[1]
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg")))
    with Pool(os.cpu_count()) as pool:
        measure(pool, "draft_decode_only", draft_decode_only, files, repeats)
        measure(pool, "draft_resize_crop", draft_resize_crop, files, repeats)
        measure(pool, "decode_only", decode_only, files, repeats)
        measure(pool, "decode_resize_crop", decode_resize_crop, files, repeats)
