"""Make ``examples/blurry/``: small blurred images from photos that ship with scikit-image.

Each is degraded by the project's own generators with a fixed seed; the clock
is scikit-image's real motion-blurred photograph. Rerun to reproduce:

    python examples/make_examples.py
"""

from pathlib import Path

import cv2
import numpy as np
import tifffile
from skimage import data

from demoe.degrade import degrade

OUT = Path(__file__).parent / "blurry"


def crop(img, size=320):
    h, w = img.shape[:2]
    size = min(size, h, w)
    y, x = (h - size) // 2, (w - size) // 2
    return img[y : y + size, x : x + size]


def to_u8(x):
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    photos = {
        "coffee_defocus.png": (data.coffee(), "defocus", {"radius": (4, 4)}),
        "chelsea_camera_shake.jpg": (data.chelsea(), "global_motion", {"length": (14, 14)}),
        "astronaut_moving_objects.png": (data.astronaut(), "local_motion", {"objects": (2, 2), "length": (18, 18)}),
        "rocket_gopro_motion.png": (data.rocket(), "synth_global_motion", {"shift": (14, 14)}),
        "astronaut_low_light.png": (data.astronaut()[100:], "low_light", {}),
    }
    for i, (name, (img, task, opts)) in enumerate(photos.items()):
        sharp = crop(img).astype(np.float32) / 255
        pair = degrade(sharp, task, rng=1000 + i, **opts)
        bgr = cv2.cvtColor(to_u8(pair.blurry), cv2.COLOR_RGB2BGR)
        params = [cv2.IMWRITE_JPEG_QUALITY, 92] if name.endswith(".jpg") else []
        cv2.imwrite(str(OUT / name), bgr, params)
    # A 16-bit, microscopy-like example: one stain channel, defocused, with an ImageJ header.
    ihc = crop(data.immunohistochemistry()).astype(np.float32) / 255
    stain = 1 - ihc[..., 2]
    pair = degrade(stain, "defocus", rng=7, radius=(3, 3), noise=0.005)
    sixteen = np.clip(np.rint(pair.blurry * 4095), 0, 4095).astype(np.uint16)  # 12-bit camera in uint16
    tifffile.imwrite(OUT / "tissue_12bit_defocus.tif", sixteen, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "YX", "unit": "um"})
    # Real motion blur, as photographed.
    cv2.imwrite(str(OUT / "clock_motion.png"), data.clock())
    print(f"wrote {len(list(OUT.iterdir()))} images to {OUT}")


if __name__ == "__main__":
    main()
