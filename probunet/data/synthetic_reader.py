"""``data.format: synthetic``: generated in memory, or read from a ``probunet synth`` folder."""

from __future__ import annotations

from . import synthetic


def read_cases(data_cfg) -> list[dict]:
    if not data_cfg.path:
        s = data_cfg.synthetic
        _check_memory(s)
        return synthetic.generate(s.num_cases, s.size, s.spatial_dims, s.num_raters, s.seed)
    from .qubiq import read_cases as read_qubiq

    items = read_qubiq(data_cfg)
    truth = synthetic.read_truth(data_cfg.path)
    for item in items:
        if item["case_id"] in truth:
            item["meta"]["truth"] = truth[item["case_id"]]
    return items


def _check_memory(s) -> None:
    """The generated set (float32 images, int64 rater masks) against the memory available."""
    from ..guards import check_memory
    from .errors import DataError

    voxels = int(s.size) ** int(s.spatial_dims)
    try:
        check_memory(int(s.num_cases) * voxels * (4 + 8 * int(s.num_raters)),
                     f"data.synthetic ({s.num_cases} cases of {s.size}^{s.spatial_dims} voxels, {s.num_raters} "
                     f"raters)")
    except ValueError as exc:
        raise DataError(str(exc)) from None


def iter_cases(data_cfg):
    """The cases one at a time (a ``probunet synth`` folder is read case by case)."""
    if not data_cfg.path:
        yield from read_cases(data_cfg)
        return
    from .qubiq import iter_cases as iter_qubiq

    truth = synthetic.read_truth(data_cfg.path)
    for item in iter_qubiq(data_cfg):
        if item["case_id"] in truth:
            item["meta"]["truth"] = truth[item["case_id"]]
        yield item
