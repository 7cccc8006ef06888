"""Where auto-detection picks low light on well-exposed or photon-limited data.

The low-light expert brightens (its job is to re-expose), so an image routed to
it by mistake changes intensity. Two probes, routed exactly as ``deblur()``
routes:

- a synthetic fluorescence field (60 bright disks on a dark background, 16-bit,
  Poisson noise) at 50, 500 and 5,000 photons per bright pixel, sharp and
  Gaussian-blurred (sigma 2 and 4 px);
- scikit-image's ``coins`` and ``camera`` with Gaussian noise sigma 0 to 0.1;
- ``astronaut``, whole and its top-left 100 px, dithered to a 256-colour palette.

``python benchmarks/noisy_routing.py`` (``--model FILE`` for other weights)
"""

import argparse

import numpy as np
from PIL import Image
from skimage import data, draw, filters

import demoe


def fluorescence(rng: np.random.Generator, size: int = 512) -> np.ndarray:
    field = np.zeros((size, size))
    for _ in range(60):
        r, c = rng.integers(20, size - 20, 2)
        rr, cc = draw.disk((r, c), rng.integers(5, 15), shape=field.shape)
        field[rr, cc] = rng.uniform(0.3, 1.0)
    return field


def line(name: str, x: np.ndarray, model) -> str:
    out, info = demoe.deblur(x, model=model, return_info=True)
    probs = info["probabilities"]
    return (f"| {name} | {info['task']} | {probs[info['task']]:.2f} | {probs['low_light']:.2f} | "
            f"{x.mean():.4g} | {out.mean():.4g} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the packaged model)")
    args = parser.parse_args(argv)
    model = demoe.load_model(args.model, device="cpu")
    rng = np.random.default_rng(1)
    print("| image | detected | p | p(low light) | mean in | mean out |")
    print("|---|---|---|---|---|---|")
    field = fluorescence(rng)
    for sigma in (0, 2, 4):
        blurred = filters.gaussian(field, sigma) if sigma else field
        for photons in (50, 500, 5000):
            counts = rng.poisson(blurred * photons + 5).astype(np.uint16)  # 5: background counts
            print(line(f"fluorescence, blur sigma {sigma}, {photons} photons", counts, model))
    for name in ("coins", "camera"):
        img = getattr(data, name)() / 255.0
        for noise in (0.0, 0.02, 0.05, 0.1):
            noisy = np.clip(img + rng.normal(0, noise, img.shape), 0, 1).astype(np.float32)
            print(line(f"{name}, noise sigma {noise}", noisy, model))
    astronaut = data.astronaut()
    for name, img in (("astronaut", astronaut), ("astronaut, top-left 100 px", astronaut[:100, :100])):
        print(line(name, np.ascontiguousarray(img), model))
        dithered = np.asarray(Image.fromarray(img).convert("P").convert("RGB"))  # Floyd-Steinberg
        print(line(f"{name}, palette-dithered", dithered, model))


if __name__ == "__main__":
    main()
