import locale
import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG_CONFIG = os.path.join(REPO, "configs", "debug.yaml")


@pytest.fixture
def debug_config_path():
    return DEBUG_CONFIG


@pytest.fixture(autouse=True)
def _keep_process_locale():
    """SimpleITK's DICOM writer (used by some tests to make inputs) sets the process locale to C;
    later tests would then decode subprocess output and files as ASCII. Restore it after each test."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)
