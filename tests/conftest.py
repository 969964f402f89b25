import locale
import os
import sys

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG_CONFIG = os.path.join(REPO, "configs", "debug.yaml")

# The tests follow the package's stage folders (tests/data, tests/models, ...). A test module may
# import another one's helpers by its plain name (``from test_export import _model``) and the shared
# browser driver ``cdp``: every test folder is on the path, so each module has one name wherever
# it is imported from.
_TESTS = os.path.dirname(os.path.abspath(__file__))
for _folder in sorted([_TESTS] + [os.path.join(_TESTS, d) for d in os.listdir(_TESTS)
                                  if os.path.isfile(os.path.join(_TESTS, d, "__init__.py")) is False
                                  and os.path.isdir(os.path.join(_TESTS, d)) and d not in ("fixtures", "__pycache__")]):
    if _folder not in sys.path:
        sys.path.insert(0, _folder)


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
