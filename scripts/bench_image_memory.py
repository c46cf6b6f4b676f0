"""Peak memory of the image transforms on thin PNGs: what one tiny file with an extreme aspect ratio costs.

Writes a 200000x1 and a 20000x1 PNG (a few hundred bytes each) and a merely wide 4000x300 one, then runs the
training transform (``data.transforms.train_transform``: random crop) and the evaluation transform
(``tokenizer.images.eval_transform``: centre crop) on each at every ``--sizes`` in a fresh subprocess, and prints
JSON: each subprocess's peak RSS (``ru_maxrss``, MB; null when the transform needed more than ``--cap-mb``), and
``baseline_mb``, the peak of a subprocess that only imports the transforms (what every row pays). The transforms
get the decoded image directly, so the readers' refusal of extreme aspect ratios does not hide what the transform
itself costs. ``--repo`` measures another checkout (e.g. the commit before a change) with the same script.

    PYTHONPATH=. python scripts/bench_image_memory.py --sizes 64 256
    python scripts/bench_image_memory.py --repo /path/to/other/checkout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = {"200000x1": (200000, 1), "20000x1": (20000, 1), "4000x300": (4000, 300)}

# Run in the subprocess: argv = [png path or "-" (imports only), size, "train" | "eval", cap in MB]; prints its peak
# RSS in MB, or "over" when the transform needed more than the cap. The cap (RLIMIT_DATA, set after the imports)
# turns what would be an out-of-memory kill of the whole machine (200000x1 at 256 px asks for ~52 GB) into a
# MemoryError in this process only.
CHILD = """
import resource, sys
from PIL import Image
from data.transforms import train_transform
from tokenizer.images import eval_transform
path, size, which, cap = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]) << 20
transform = (train_transform if which == "train" else eval_transform)(size, uint8=True)
if path != "-":
    with Image.open(path) as img:
        img = img.convert("RGB")
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    try:
        out = transform(img)
    except (MemoryError, RuntimeError):  # PIL and torch (DefaultCPUAllocator) running out under the cap
        print("over")
        sys.exit()
    assert tuple(out.shape) == (3, size, size), out.shape
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def write_pngs(folder: str) -> dict[str, str]:
    """{name: path} of the IMAGES as flat-colour RGB PNGs (they compress to a few hundred bytes)."""
    from PIL import Image

    paths = {}
    for name, size in IMAGES.items():
        paths[name] = os.path.join(folder, f"{name}.png")
        Image.new("RGB", size, (200, 40, 40)).save(paths[name])
    return paths


def peak_rss_mb(path: str, size: int, which: str, repo: str = REPO, cap_mb: int = 8192) -> float | None:
    """Peak RSS (MB) of a fresh Python process that applies one transform to the PNG at `path` ("-": none);
    None when the transform needed more than `cap_mb` of data memory (it got a MemoryError instead)."""
    env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, path, str(size), which, str(cap_mb)], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{which} transform at {size}px on {path} failed (exit {out.returncode}): "
                           f"{out.stderr.strip()[-2000:]}")
    last = out.stdout.strip().splitlines()[-1]
    return None if last == "over" else round(float(last), 1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="output sizes (default 64 256)")
    p.add_argument("--transforms", nargs="+", default=["train", "eval"], choices=["train", "eval"])
    p.add_argument("--repo", default=REPO, help="checkout whose transforms are measured (default: this one)")
    p.add_argument("--cap-mb", type=int, default=8192,
                   help="data memory a transform may use; beyond it the row says null (default 8192)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        pngs = write_pngs(tmp)
        result = {"repo": os.path.abspath(a.repo), "baseline_mb": peak_rss_mb("-", a.sizes[0], "eval", a.repo),
                  "cap_mb": a.cap_mb,
                  "rows": []}
        for name, path in pngs.items():
            for size in a.sizes:
                for which in a.transforms:
                    row = {"image": name, "png_bytes": os.path.getsize(path), "size": size, "transform": which,
                           "peak_rss_mb": peak_rss_mb(path, size, which, a.repo, a.cap_mb)}
                    result["rows"].append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
