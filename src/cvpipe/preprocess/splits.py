"""Train/val/test splits that do not leak: stratified or predefined, near-duplicates kept together.

* **Near-duplicates** are found with a 64-bit perceptual hash (``imagehash.phash``)
  of every image: two images whose hashes differ in at most
  ``split.near_duplicate_distance`` bits are linked, and linked images form a
  group (connected components; :mod:`cvpipe.preprocess.near_duplicates` finds them
  without comparing all pairs). A resized or recompressed copy of a photo lands
  within a few bits of the original.
* Every function here is linear in the images (sorts and ``np.unique``), no
  per-group or per-class Python loop: a million images split in seconds.
* **Stratified** splits (scikit-learn ``train_test_split``) are drawn over
  *groups*, stratified by each group's majority label, so a group never
  straddles train/val/test. Without near-duplicates every group is one image
  and this is the plain stratified split.
* **Predefined** keeps ingest's split hint (``train/``, ``val/``, ``test/``
  folders) exactly: every hinted image stays in its hinted split. A split with
  no hinted images is carved, group-aware and stratified, out of the train
  folder (see ``split.test_from``). Groups that straddle the hinted folders are
  reported, never moved.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import numpy as np

from cvpipe.core.errors import StageError

SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------- hashing / grouping


def groups_report(groups: np.ndarray, ids: list[str], labels: np.ndarray, classes: list[str]) -> list[dict]:
    """The multi-image groups: member ids and labels (a mixed-label group is flagged)."""
    out = []
    groups = np.asarray(groups)
    multi = np.bincount(groups)[groups] > 1  # singletons (most images) never reach the Python loop
    order = np.flatnonzero(multi)
    order = order[np.argsort(groups[order], kind="stable")]
    g_sorted = groups[order]
    bounds = np.flatnonzero(np.diff(g_sorted)) + 1
    for members in np.split(order, bounds):
        if len(members) < 2:
            continue
        labs = sorted({classes[labels[i]] for i in members})
        out.append({"ids": [ids[i] for i in members], "labels": labs, "mixed_labels": len(labs) > 1})
    out.sort(key=lambda g: (-len(g["ids"]), g["ids"][0]))
    return out


def straddling_groups(groups: np.ndarray, splits: dict[str, np.ndarray]) -> list[int]:
    """Group ids that have members in more than one split (leakage)."""
    groups = np.asarray(groups)
    parts = [np.unique(groups[np.asarray(idx, dtype=np.int64)]) for idx in splits.values()]
    if not parts:
        return []
    ids, seen_in = np.unique(np.concatenate(parts), return_counts=True)
    return ids[seen_in > 1].tolist()


# ----------------------------------------------------------------------------- splitting


def _unit_labels(idx: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique groups among ``idx`` and each group's majority label (ties: the lowest label)."""
    units, inverse = np.unique(groups[idx], return_inverse=True)
    unit_of = inverse.reshape(-1).astype(np.int64)
    lab = np.asarray(labels)[idx].astype(np.int64)
    width = int(lab.max()) + 1 if len(lab) else 1
    pairs, counts = np.unique(unit_of * width + lab, return_counts=True)  # (unit, label) -> count
    pair_unit, pair_label = pairs // width, pairs % width
    best = np.lexsort((pair_label, -counts, pair_unit))  # per unit: most members first, then lowest label
    first = best[np.r_[True, pair_unit[best][1:] != pair_unit[best][:-1]]]
    unit_label = np.zeros(len(units), dtype=np.int64)
    unit_label[pair_unit[first]] = pair_label[first]
    return units, unit_label


def _check_enough(idx: np.ndarray, labels: np.ndarray, groups: np.ndarray, classes: list[str], needed: int, what: str) -> None:
    units, unit_label = _unit_labels(idx, labels, groups)
    per_class = Counter(unit_label.tolist())
    images = Counter(labels[idx].tolist())
    too_few = [c for c in sorted(images) if per_class.get(c, 0) < needed]
    if too_few:
        detail = ", ".join(
            f"{classes[c]} ({images[c]} images"
            + (f", {per_class.get(c, 0)} after grouping near-duplicates" if per_class.get(c, 0) != images[c] else "")
            + ")"
            for c in too_few
        )
        raise StageError(f"too few images for {what}: each class needs at least {needed}; {detail}")


def carve(idx: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int, classes: list[str],
          what: str) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (kept, carved) with ``fraction`` of the groups carved, stratified, group-aware."""
    from sklearn.model_selection import train_test_split

    if fraction <= 0:
        return np.sort(idx), idx[:0]
    _check_enough(idx, labels, groups, classes, 2, what)
    units, unit_label = _unit_labels(idx, labels, groups)
    try:
        keep_u, carve_u = train_test_split(
            np.arange(len(units)), test_size=fraction, stratify=unit_label, random_state=seed
        )
    except ValueError as exc:
        raise StageError(f"cannot make {what} with split fraction {fraction:.3g}: {exc}") from None
    in_carve = np.isin(groups[idx], units[carve_u])
    return np.sort(idx[~in_carve]), np.sort(idx[in_carve])


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int, classes: list[str],
                     groups: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Seeded stratified train/val/test indices over near-duplicate groups (scikit-learn)."""
    labels = np.asarray(labels)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    idx = np.arange(len(labels))
    needed = sum(1 for f in fractions.values() if f > 0)
    _check_enough(idx, labels, groups, classes, needed, f"a {needed}-way split")
    rest_frac = fractions["val"] + fractions["test"]
    train, rest = carve(idx, labels, groups, rest_frac, seed, classes, "the val/test splits")
    if fractions["val"] == 0 or fractions["test"] == 0:
        out = {"train": train, "val": idx[:0], "test": idx[:0]}
        out["test" if fractions["val"] == 0 else "val"] = rest
        return out
    val, test = carve(rest, labels, groups, fractions["test"] / rest_frac, seed, classes, "the test split")
    return {"train": train, "val": val, "test": test}


def predefined_split(hints: list[str], labels: Optional[np.ndarray] = None, classes: Optional[list[str]] = None, *,
                     fractions: Optional[dict[str, float]] = None, seed: int = 42, groups: Optional[np.ndarray] = None,
                     test_from: str = "val") -> dict[str, np.ndarray]:
    """Keep the split recorded by ingest exactly; carve only splits that have no hinted images.

    With no ``test/`` folder: ``test_from="val"`` makes the val folder the test
    split and carves val out of the train folder (fraction val/(train+val));
    ``test_from="train"`` keeps val and carves test out of train (test/(train+test)).
    With neither val/ nor test/, both are carved from train with the stratified fractions.
    """
    arr = np.asarray(hints, dtype=str)
    missing = int((arr == "").sum())
    if missing:
        raise StageError(
            f"split.strategy is 'predefined' but {missing} images have no split hint "
            "(ingest a folder laid out as train/<class>/, val/<class>/, test/<class>/)"
        )
    unknown = sorted(set(arr.tolist()) - set(SPLITS))
    if unknown:
        raise StageError(f"unknown split hint(s) {', '.join(unknown)} in the manifest (expected train, val, test)")
    out = {s: np.flatnonzero(arr == s) for s in SPLITS}
    if len(out["train"]) == 0:
        raise StageError("split.strategy is 'predefined' but no image has the split hint 'train'")
    if labels is None or (len(out["val"]) and len(out["test"])):
        return out
    labels = np.asarray(labels)
    classes = classes or [str(c) for c in range(int(labels.max()) + 1)]
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    fr = fractions or {"train": 0.7, "val": 0.15, "test": 0.15}
    has_val, has_test = len(out["val"]) > 0, len(out["test"]) > 0
    train = out["train"]
    if not has_val and not has_test:
        sub = stratified_split(labels[train], fr, seed, classes, groups[train])
        return {k: train[v] for k, v in sub.items()}
    if not has_test and test_from == "val":
        out["test"] = out["val"]
        frac = fr["val"] / (fr["train"] + fr["val"])
        out["train"], out["val"] = carve(train, labels, groups, frac, seed, classes, "a val split from the train folder")
    elif not has_test:
        frac = fr["test"] / (fr["train"] + fr["test"])
        out["train"], out["test"] = carve(train, labels, groups, frac, seed, classes, "a test split from the train folder")
    else:  # test/ given, no val/
        frac = fr["val"] / (fr["train"] + fr["val"])
        out["train"], out["val"] = carve(train, labels, groups, frac, seed, classes, "a val split from the train folder")
    return out
