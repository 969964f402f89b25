"""``probunet synth``: the synthetic multi-rater set (:mod:`probunet.data.synthetic`) written in the QUBIQ
layout, optionally as a shifted copy (:mod:`.shift`: the same cases, masks and truth, other images)."""

from __future__ import annotations

from pathlib import Path

from ..data import synthetic
from ..options import SynthOptions
from .shift import check_shift, severity_of, shift_items


def synth_command(options: SynthOptions) -> Path:
    """Write the set ``options`` describes into ``options.out`` (refused when it holds anything); returns the
    folder. ``truth.json`` there records the generator settings and each case's truth."""
    o = options
    severity = severity_of(o.shift, o.severity)
    if o.shift:
        check_shift(o.shift, severity, o.size)  # before a case is generated
    items = synthetic.iter_generate(o.num_cases, o.size, o.spatial_dims, o.num_raters, o.seed,
                                    lesion_offcentre=bool(o.lesion_offcentre))
    params = {"num_cases": o.num_cases, "size": o.size, "spatial_dims": o.spatial_dims,
              "num_raters": o.num_raters, "seed": o.seed}
    if o.lesion_offcentre:
        params["lesion_offcentre"] = True
    if o.shift:
        items = shift_items(items, o.shift, severity, seed=o.seed)  # same masks and truth
        params["shift"] = {"kind": o.shift, "severity": severity}
    return synthetic.write_qubiq(items, Path(o.out), params=params)


__all__ = ["synth_command"]
