"""A trained model outside probunet: the TorchScript or ONNX sampler (:mod:`.exporter`) and
the MONAI Bundle (:mod:`.bundle`)."""

from .bundle import write_bundle  # noqa: F401
from .exporter import EXPORT_FORMATS, ExportError, ExportResult, export_model  # noqa: F401

__all__ = ["EXPORT_FORMATS", "ExportError", "ExportResult", "export_model", "write_bundle"]
