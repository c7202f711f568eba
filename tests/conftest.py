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


def _load_repo_script(relative_path: str):
    """A repository script (``training/x.py``, ``benchmarks/x.py``) as a module: the scripts are not a package."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location("_script_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def repo_script():
    """``repo_script("training/train_prior.py")`` loads a script of the repository as a module."""
    return _load_repo_script
