"""Sample data: blurred images made by demoe's own blur code from scikit-image's photos.

Nothing is downloaded and torch is never imported here (``demoe.degrade``
uses numpy and OpenCV only).
"""

from __future__ import annotations

import numpy as np


def _photo(name: str, task: str, seed: int, **options):
    from skimage import data

    from demoe.degrade import degrade

    sharp = getattr(data, name)().astype(np.float32) / 255
    blurry = degrade(sharp, task, rng=seed, **options).blurry
    return np.clip(np.rint(blurry * 255), 0, 255).astype(np.uint8)


def camera_shake_photo():
    """scikit-image's cat photo with a camera-shake kernel."""
    img = _photo("chelsea", "global_motion", 3, length=(14, 14))
    return [(img, {"name": "cat (camera shake)", "rgb": True})]


def defocused_photo():
    """scikit-image's coffee photo, out of focus."""
    img = _photo("coffee", "defocus", 4, radius=(4, 4))
    return [(img, {"name": "coffee (defocus)", "rgb": True})]


def motion_blurred_clock():
    """A real motion-blurred photograph (scikit-image's ``clock``)."""
    from skimage import data

    return [(data.clock(), {"name": "clock (real motion blur)", "colormap": "gray"})]


def microscopy_stack():
    """A 16-bit (12-bit range) Z-stack of a tissue stain, defocus growing away from the middle plane."""
    from skimage import data

    from demoe.degrade import degrade

    ihc = data.immunohistochemistry().astype(np.float32) / 255
    stain = 1 - ihc[..., 2]
    planes = []
    for z, radius in enumerate((4.0, 2.0, 0.5, 2.0, 4.0)):
        blurry = degrade(stain, "defocus", rng=z, radius=(radius, radius), noise=0.004).blurry
        planes.append(np.clip(np.rint(blurry * 4095), 0, 4095).astype(np.uint16))
    stack = np.stack(planes)
    return [(stack, {"name": "tissue Z-stack (defocus, 12-bit)", "colormap": "magma",
                     "scale": (2.0, 0.5, 0.5), "contrast_limits": (0, 4095)})]
