"""Training augmentation declared in params.yaml, built with albumentations.

``augment.train`` is a list of ``{TransformName: {argument: value}}`` items, for
example::

    augment:
      train:
        - HorizontalFlip: {p: 0.5}
        - Affine: {translate_percent: 0.1, rotate: [-10, 10], p: 0.7}

Each name must be an albumentations transform and each argument one it accepts;
otherwise :class:`ParamsError` names the item. The built pipeline is serialized
with albumentations' own ``to_dict`` so the exact pipeline is saved beside the
dataset and logged with the run; ``from_dict`` restores it identically.
Normalization is not part of it: it runs on the batch tensor with the model's
mean/std (faster, and correct for whatever model trains on the data).
"""

from __future__ import annotations

import inspect
import json
import warnings
from typing import Any, Optional, Sequence

from cvpipe.core.config import AugmentParams
from cvpipe.core.errors import ParamsError


def build(aug: AugmentParams, *, seed: int | None = None):
    import albumentations as A

    transforms = []
    for i, item in enumerate(aug.train):
        ((name, args),) = item.items()
        key = f"augment.train[{i}].{name}"
        cls = getattr(A, name, None)
        if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
            raise ParamsError(f"augment.train[{i}]: unknown albumentations transform {name!r}")
        if issubclass(cls, A.Normalize):
            raise ParamsError(f"{key}: leave normalization out; cvpipe normalizes with the model's mean/std")
        args = dict(args or {})
        sig = inspect.signature(cls.__init__)
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        unknown = sorted(set(args) - set(sig.parameters) - {"self"})
        if unknown and not accepts_any:
            raise ParamsError(f"{key}: unknown argument(s) {', '.join(unknown)} (got {args!r})")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # albumentations warns on invalid arguments
                transforms.append(cls(**args))
        except Exception as exc:  # pydantic ValidationError, TypeError, ValueError, UserWarning
            msg = str(exc).strip().splitlines()
            raise ParamsError(f"{key}: invalid arguments {args!r}: {' '.join(m.strip() for m in msg[:4])}") from None
    return A.Compose(transforms, seed=seed)


def to_dict(pipeline) -> dict[str, Any]:
    import albumentations as A

    return A.to_dict(pipeline)


def from_dict(d: dict[str, Any]):
    import albumentations as A

    return A.from_dict(d)


def to_json(pipeline) -> str:
    return json.dumps(to_dict(pipeline), indent=2, sort_keys=True) + "\n"


def eval_pipeline(image_size: int, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
    """The eval-time transform derived from the dataset: resize (and normalize, when mean/std are given).

    Nothing random and nothing geometric beyond the resize. On prepared arrays
    the resize is a no-op; normalization uses the *model's* mean/std, which
    train/evaluate apply on the batch tensor (so preprocess saves it without).
    """
    import albumentations as A

    transforms = [A.Resize(image_size, image_size)]
    if mean is not None and std is not None:
        transforms.append(A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0))
    return A.Compose(transforms)


def from_json_file(path) -> Any:
    """Load a pipeline saved by :func:`to_json` (e.g. ``<prepared>/augment.json``)."""
    from pathlib import Path

    return from_dict(json.loads(Path(path).read_text()))
