import pytest
import torch

import npp


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> npp.ModelConfig:
    """An 8×8 grid, 64 codes, 10 classes: every test model is built from this in milliseconds."""
    return npp.ModelConfig.preset("debug", vocab_size=64, num_classes=10, grid=8)


def random_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (the zero-initialised head too) random values, so tests see real logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return model
