#!/usr/bin/env python
"""Build Prob U-Net LIDC crops from the LIDC-IDRI archive: ``probunet prepare-lidc`` from a source checkout.

The same options as ``probunet prepare-lidc`` (see ``probunet prepare-lidc --help`` and
:mod:`probunet.data.lidc_prepare`), plus ``-v`` for the progress log::

    python scripts/prepare_lidc.py --dicom-root /data/LIDC-IDRI --out data/lidc
    python scripts/prepare_lidc.py --annotations-only --out /tmp/l --limit 5   # masks only, no images needed
    python scripts/prepare_lidc.py --synthetic-images --crop-size 64 --out data/lidc_style   # no CT needed
    python scripts/prepare_lidc.py --3d --synthetic-images --out data/lidc3d_style
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/_common (also when loaded from its file)
import _common  # noqa: E402,F401  (probunet importable from a source checkout)

from probunet.cli import main as probunet_main  # noqa: E402


def main(argv=None) -> int:
    """``probunet [--quiet] prepare-lidc ARGS``: ``-v`` / ``--verbose`` keeps the per-scan log (INFO)."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in args)
    args = [a for a in args if a not in ("-v", "--verbose")]
    return probunet_main([*([] if verbose else ["--quiet"]), "prepare-lidc", *args])


if __name__ == "__main__":
    sys.exit(main())
