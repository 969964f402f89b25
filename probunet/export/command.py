"""``probunet export`` as a library call: :func:`.exporter.export_model` with a
:class:`probunet.options.ExportOptions`."""

from __future__ import annotations

from ..options import ExportOptions
from .exporter import ExportResult, export_model


def export_command(options: ExportOptions) -> ExportResult:
    """Export ``options.source`` as ``options.format`` to ``options.out`` (see :func:`export_model`)."""
    o = options
    return export_model(o.source, o.format, o.out, num_samples=o.num_samples, overwrite=o.overwrite, seed=o.seed,
                        roi_size=o.roi, evaluation=o.evaluation)


__all__ = ["export_command"]
