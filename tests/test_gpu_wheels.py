"""scripts/gpu_wheels.sh: pinned versions (vector-quantize-pytorch as pyproject.toml pins it), a rerun removes the
wheels it downloaded before and nothing else, and a stale other version it did not download stops it by name.
pip really runs, from a local index of small real wheels (PIP_NO_INDEX, PIP_FIND_LINKS), on a copy of the script
(it writes .whl/ beside its own directory)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_wheels.sh"


def pins(script: Path = SCRIPT) -> dict[str, str]:
    block = re.search(r"^PINS=\((.*?)^\)", script.read_text(), re.S | re.M)[1]
    return dict(pin.split("==") for pin in block.split())


def wheel_name(dist: str, version: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', dist).lower()}-{version}-py3-none-any.whl"


def make_wheel(directory: Path, dist: str, version: str) -> Path:
    """A real (empty) wheel: the metadata pip reads, no code."""
    path = directory / wheel_name(dist, version)
    info = f"{wheel_name(dist, version).split('-')[0]}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_vector_quantize_pytorch_is_pinned_to_the_tested_version():
    pinned = re.search(r'"vector-quantize-pytorch==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert pinned, "pyproject.toml must pin vector-quantize-pytorch (tokenizer/quantizer.py patches its internals)"
    assert pins()["vector-quantize-pytorch"] == pinned[1] == importlib.metadata.version("vector-quantize-pytorch")


def test_rerun_replaces_its_own_wheels_only_and_names_a_stale_foreign_one(tmp_path):
    index, work = tmp_path / "index", tmp_path / "checkout"
    index.mkdir()
    (work / "scripts").mkdir(parents=True)
    script = work / "scripts" / "gpu_wheels.sh"
    shutil.copy(SCRIPT, script)
    for dist, version in [*pins().items(), ("einops", "9.9.9")]:  # 9.9.9: the next pin, below
        make_wheel(index, dist, version)
    (work / ".whl").mkdir()
    theirs = make_wheel(work / ".whl", "someone-elses", "1.0")
    env = {**os.environ, "PYTHON": sys.executable, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index),
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}  # fmt: skip

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip

    def wheels() -> set[str]:
        return {p.name for p in (work / ".whl").glob("*.whl")}

    first = run()
    assert first.returncode == 0, first.stderr
    assert wheels() == {wheel_name(d, v) for d, v in pins().items()} | {theirs.name}

    # a new pin: the rerun removes the einops wheel it downloaded before, keeps what it did not download
    script.write_text(script.read_text().replace("einops==0.8.2", "einops==9.9.9"))
    second = run()
    assert second.returncode == 0, second.stderr
    assert wheel_name("einops", "9.9.9") in wheels() and wheel_name("einops", "0.8.2") not in wheels()
    assert theirs.exists() and len(wheels()) == len(pins()) + 1

    # another version of a pinned package that the script did not download: it stops, naming the file
    stale = make_wheel(work / ".whl", "webdataset", "0.1.0")
    third = run()
    assert third.returncode == 1 and stale.name in third.stderr and "remove it" in third.stderr, third.stderr
    assert stale.exists() and theirs.exists()
