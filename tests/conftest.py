import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Reference outputs of the published DeMoE. They live beside the repository, not in it
# (nor in the sdist): where they are missing, their tests skip, unless DEMOE_CONFORMANCE
# names them (as .ci/run does whenever they are there), and then they must be there.
CONFORMANCE = Path(os.environ.get("DEMOE_CONFORMANCE") or ROOT.parent / "shared" / "conformance")
# Our own conformance data, in the repository: the routing and every expert's output of a seeded tiny model.
PINNED = ROOT / "tests" / "data" / "pinned_tiny.npz"


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    if not (CONFORMANCE / "demoe_tiny.pt").is_file():
        if os.environ.get("DEMOE_CONFORMANCE"):
            pytest.fail(f"DEMOE_CONFORMANCE names no conformance data: {CONFORMANCE} has no demoe_tiny.pt")
        pytest.skip(f"conformance data not found at {CONFORMANCE} (set DEMOE_CONFORMANCE)")
    return CONFORMANCE


def randomize(model, seed=0):
    """Give every parameter and batch-norm statistic a non-trivial value."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype.is_floating_point:
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture
def tiny_model():
    """A small random DeMoE (two levels, five experts, k=1)."""
    from demoe import DeMoE

    return randomize(DeMoE(width=4, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1], num_exp=5, top_k=1))


@pytest.fixture
def identity_model():
    """A DeMoE whose output is exactly its input (zero ending conv): exact layout/tiling checks."""
    import torch

    from demoe import DeMoE

    model = randomize(DeMoE(width=4, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1]), seed=5)
    with torch.no_grad():
        model.ending.weight.zero_()
        model.ending.bias.zero_()
    return model


@pytest.fixture(scope="session")
def default_model():
    from demoe import load_model

    return load_model(device="cpu")


@pytest.fixture(scope="session")
def blurred_photo():
    """A real photo (scikit-image's astronaut, 512x512) with defocus blur, uint8."""
    import numpy as np
    from skimage import data

    from demoe.degrade import degrade

    sharp = data.astronaut().astype(np.float32) / 255
    pair = degrade(sharp, "defocus", rng=1, radius=(3, 3))
    return (pair.blurry * 255).round().astype(np.uint8), (pair.sharp * 255).round().astype(np.uint8)


@pytest.fixture(scope="session")
def packaged_onnx(tmp_path_factory):
    """The packaged model as `demoe export onnx -o demoe.onnx --overwrite` writes it over an older file (once a
    session: torch.onnx takes 10-20 s of CPU time for it)."""
    from demoe import cli

    path = tmp_path_factory.mktemp("onnx") / "demoe.onnx"
    path.write_bytes(b"an older export")
    assert cli.main(["export", "onnx", "-o", str(path), "--overwrite"]) == 0
    return path


def pinned_model():
    """A tiny DeMoE (two levels, five experts, k=1) whose every number comes from a fixed seed, drawn from
    numpy's ``RandomState`` (a stream numpy never changes): the model of the outputs pinned in :data:`PINNED`."""
    import numpy as np
    import torch

    from demoe import DeMoE

    model = DeMoE(width=4, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1], num_exp=5, top_k=1)
    rs = np.random.RandomState(25)
    state = model.state_dict()
    with torch.no_grad():
        for name in sorted(state):  # by name: the module order in model.py does not matter
            if state[name].dtype.is_floating_point:
                shape = tuple(state[name].shape)
                values = rs.uniform(0.5, 1.5, shape) if name.endswith("running_var") else rs.normal(0, 0.2, shape)
                state[name].copy_(torch.from_numpy(np.asarray(values, np.float32)))
    return model.eval()


def pinned_outputs(model) -> dict:
    """What :data:`PINNED` holds: an odd-sized input of two images, their routing, every expert's output."""
    import numpy as np
    import torch

    from demoe import TASKS

    x = np.random.RandomState(26).uniform(0, 1, (2, 3, 11, 13)).astype(np.float32)
    t = torch.from_numpy(x)
    with torch.no_grad():
        out = {"input": x, "probabilities": model.route(t).numpy(), "output_auto": model(t).numpy()}
        out.update({f"output_{task}": model(t, task=task).numpy() for task in TASKS})
    return out


if __name__ == "__main__":  # `python tests/conftest.py` pins the outputs anew: only when the network must change
    import numpy as np

    PINNED.parent.mkdir(exist_ok=True)
    np.savez_compressed(PINNED, **pinned_outputs(pinned_model()))
    print(f"wrote {PINNED}")
