"""Whether the pretrained LPIPS-VGG16 and FID-Inception weights are installed (`make weights`), as skip markers.

Only the files are looked for (tokenizer/weights.py's resolution: torch hub cache, then the converted file), so the
probe is cheap at import; a file that is present but damaged fails the test that loads it instead of skipping it.
"""

from __future__ import annotations

import pytest

from tokenizer import weights


def _installed(resolve) -> bool:
    try:
        resolve()
        return True
    except FileNotFoundError:
        return False


def have_lpips() -> bool:
    return _installed(weights.resolve_vgg16_weights)


def have_inception() -> bool:
    return _installed(weights.resolve_inception_weights)


LPIPS_ABSENT = f"LPIPS VGG16 weights absent ({weights.vgg16_weights_path()}); run `make weights`"
INCEPTION_ABSENT = f"FID Inception weights absent ({weights.inception_weights_path()}); run `make weights`"

needs_lpips = pytest.mark.skipif(not have_lpips(), reason=LPIPS_ABSENT)
needs_inception = pytest.mark.skipif(not have_inception(), reason=INCEPTION_ABSENT)


def skip_without_lpips() -> None:
    """For fixtures (a mark cannot skip one): skip the test that needs the LPIPS weights when they are absent."""
    if not have_lpips():
        pytest.skip(LPIPS_ABSENT)
