"""Built-in sample data, so a fresh clone runs end to end with no data of its own.

``sample://digits`` is scikit-learn's bundled copy of the UCI handwritten digits
(1,797 real 8x8 grayscale scans, 10 classes). It ships inside the scikit-learn
wheel, so no network is needed. It is written out as ordinary PNG files in class
folders, and from there it is ingested like any user's folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from cvpipe.core import storage
from cvpipe.core.errors import ParamsError

SAMPLES = {"digits": "scikit-learn's handwritten digits: 1,797 8x8 grayscale scans, classes 0-9"}


def cache_root() -> Path:
    return Path(os.environ.get("CVPIPE_CACHE", Path.home() / ".cache" / "cvpipe"))


def materialize(name: str, dest: Path | None = None) -> Path:
    """Write sample *name* as ``dest/<class>/<index>.png``; reuse a complete earlier copy."""
    if name not in SAMPLES:
        raise ParamsError(f"ingest.source: unknown sample {name!r} (available: {', '.join(sorted(SAMPLES))})")
    dest = Path(dest) if dest is not None else cache_root() / "samples" / name
    marker = dest.parent / f"{dest.name}.complete"
    if marker.exists() and dest.is_dir():
        return dest
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    # pixel values are counts 0..16 of a 4x4 block of the original 32x32 bitmap
    images = np.clip(digits.images * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)
    with storage.staged_dir(dest) as tmp:
        for i, (img, target) in enumerate(zip(images, digits.target)):
            cls_dir = tmp / str(int(target))
            cls_dir.mkdir(exist_ok=True)
            Image.fromarray(img, mode="L").save(cls_dir / f"{i:04d}.png")
    marker.write_text(f"{len(images)}\n")
    return dest
