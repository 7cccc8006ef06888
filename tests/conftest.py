import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFORMANCE = Path(os.environ.get("DEMOE_CONFORMANCE", ROOT.parent / "shared" / "conformance"))


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    if not (CONFORMANCE / "demoe_tiny.pt").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"conformance data missing in CI: {CONFORMANCE}")
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

    return randomize(DeMoE(width=4, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1], num_exp=5, k_used=1))
