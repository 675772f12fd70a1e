from pathlib import Path

import gin
import pytest
import torch

REFERENCE = Path(__file__).resolve().parent / "reference"  # test vectors from the original public code


@pytest.fixture(autouse=True)
def _clean_state():
    """Tests are deterministic and never leak gin bindings into each other."""
    torch.manual_seed(0)
    gin.clear_config()
    yield
    gin.clear_config()
