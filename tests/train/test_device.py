"""One place resolves the device (probunet.utils.resolve_device): the trainer, torchrun's ranks and
``probunet evaluate`` all go through it."""

from __future__ import annotations

import pytest
import torch

from probunet.runtime import distributed
from probunet.utils import resolve_device


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA present (whatever the machine), ``set_device`` recorded instead of called."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: current.append(torch.device(dev)))
    return current


def test_names_resolve_and_auto_follows_cuda(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")  # an unset option means auto
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_a_local_rank_picks_and_sets_the_process_gpu(fake_cuda):
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda", 3)
    assert resolve_device("auto", local_rank=2) == torch.device("cuda", 2)
    assert resolve_device("cuda:1", local_rank=3) == torch.device("cuda", 1)  # an explicit index wins
    assert fake_cuda == [torch.device("cuda", 3), torch.device("cuda", 2), torch.device("cuda", 1)]
    assert resolve_device("cuda") == torch.device("cuda") and len(fake_cuda) == 3  # single process: not set
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")


def test_rank_device_goes_through_resolve_device(fake_cuda):
    two = distributed.DistInfo(rank=1, world_size=2, local_rank=1)
    assert distributed.rank_device(torch.device("cuda"), two) == torch.device("cuda", 1)
    assert fake_cuda == [torch.device("cuda", 1)]
    assert distributed.rank_device(torch.device("cuda"), distributed.DistInfo()) == torch.device("cuda")
    assert distributed.rank_device(torch.device("cpu"), two) == torch.device("cpu")


def test_errors_name_the_option_when_given(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^--device cuda:1: CUDA is not available on this machine; use --device "
                                         r"auto or --device cpu$"):
        resolve_device("cuda:1", option="--device")
    with pytest.raises(ValueError, match=r"^--device tpu: not a device \(RuntimeError\); use auto, cpu, cuda"):
        resolve_device("tpu", option="--device")
    with pytest.raises(ValueError, match=r"^device 'cuda' requested but CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(RuntimeError):  # without an option: torch's own error
        resolve_device("tpu")


def test_only_utils_resolves_a_device():
    """No module of probunet picks or sets a device on its own (distributed.py and evaluate once did)."""
    import ast
    from pathlib import Path

    import probunet

    root = Path(probunet.__file__).parent
    picking = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and "resolve_device" in node.name and path.name != "utils.py":
                picking.append(f"{path.name}: def {node.name}")
            if isinstance(node, ast.Attribute) and node.attr == "set_device" and path.name != "utils.py":
                picking.append(f"{path.name}: set_device")
    assert picking == []
    users = [p.name for p in sorted(root.rglob("*.py"))
             if "resolve_device(" in p.read_text(encoding="utf-8") and p.name != "utils.py"]
    assert {"distributed.py", "trainer.py"} <= set(users)
    assert "command.py" in users  # probunet evaluate's --device (probunet.evaluation.command)
