"""Test configuration: everything runs offline against a throw-away Hugging Face home.

The Hub environment variables are read when huggingface_hub is imported, so they are set here, before
any test module imports an HF library.
"""

import os
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="hf_rq_test_home_")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The test models are tiny: one thread is faster than two, which mostly wait on each other (and on the
# other process of the 2-process DDP test).
torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
