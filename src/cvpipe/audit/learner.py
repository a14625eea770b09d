"""Out-of-sample class probabilities for every audited image, by cross-fitting a scikit-learn pipeline.

Confident learning needs, for each image, probabilities from a model that never saw that image's
label, else a memorised wrong label looks right. So the images are cut into ``audit.folds`` folds
(scikit-learn's ``StratifiedGroupKFold``: class proportions kept, and a near-duplicate group never
split over folds, or a copy of a mislabelled image would vouch for its label) and each fold is
scored by a model fitted on the others (``cross_val_predict``).

Two learners (``audit.features``; ``auto`` = embeddings when ``audit.backbone`` or
``train.pretrained_path`` is set, else pixels):

* **pixels** (the default, no backbone): downscaled pixels -> PCA -> distance-weighted k nearest
  neighbours. Use it for small, centred, uniform images (digits, icons, scans) and whenever no
  backbone exists: it needs no trained model, so the stage runs right after preprocess and a training
  change does not rerun it. Measured on the 1,797 digits with 5 % of labels flipped (seeds 0, 1, 2;
  train/README.md, "audit"): k-NN on 8 px, PCA 32, k 15 found the flips with precision
  0.905/0.905/0.985 and recall 0.838/0.870/0.855 in 5-9 s; a logistic regression on the same pixels
  reached only precision 0.60-0.67 (it underfits, ~0.87 out-of-sample accuracy, so clean images look
  doubtful), an RBF kernel (Nystroem + logistic regression) precision 0.90 but recall 0.56-0.64 in
  18-38 s; standardizing the pixels hurt (precision 0.85: it blows up the near-constant border pixels).
  On photos it is useless: hymenoptera 0.55 out-of-sample accuracy (largest class 0.51).
* **embeddings** (:mod:`cvpipe.audit.embeddings`): a timm backbone's pooled pre-logits features,
  L2-normalised, then ``audit.embedding_head``: a logistic regression (default) or the k-NN. Use it for
  photos. Best is a backbone **pretrained on other data** (``train.pretrained_path`` weights): it never
  saw these labels, so cross-fitting the head is all the protection needed. A **cvpipe checkpoint
  trained on these very labels** (``models/<arch>/seed<seed>/best.pt``) works too, with a caveat: cross-fitting
  the head does not undo a backbone that has fitted the noise; a network that memorised a wrong label
  maps that image near the wrong class, the held-out head then agrees with the wrong label, and the
  error is missed. The risk grows with training length (near-100 % train accuracy = memorised).
  Measured (train/README.md, "audit"): hymenoptera with a resnet18 trained from scratch 4 epochs
  (val 0.65): out-of-sample accuracy 0.66 (logistic; k-NN 0.63) vs 0.55 for pixels, and 3 of the top
  10 suspects are real label problems (a hover fly and a wasp labelled bees, an ant with a wasp)
  where pixels had none. Digits with 5 % flipped, resnet18 trained on the flipped labels: its epoch-7
  best.pt (it predicts none of the 68 flipped train images as their wrong label) gives precision 0.97,
  recall 0.78 (pixels: 0.905 / 0.838); its epoch-18 last.pt (26 of the 68 fitted) precision 1.00, recall
  0.48: the memorised flips are missed.
"""

from __future__ import annotations


import numpy as np

from cvpipe.core.config import AuditParams
from cvpipe.core.console import warn
from cvpipe.core.errors import StageError

CHUNK = 4096  # images converted to float at a time: memory is bounded by the small feature matrix, not the images


def pixel_features(images, side: int) -> np.ndarray:
    """(N, side*side*3) float32: each (H, W, 3) uint8 image area-averaged down to side x side, scaled to 0..1.

    Hand-written because it is one reshape-mean over a memory-mapped array, read CHUNK images at a time
    (PIL would decode nothing here and cost a Python call per image). When H is not a multiple of side,
    the nearest smaller multiple is centre-cropped first. *images* is anything sliceable to uint8 arrays
    (a memory-mapped split, :class:`cvpipe.audit.stage.AuditImages`).
    """
    n, h, w, c = images.shape
    side = min(side, h, w)
    fh, fw = h // side, w // side
    top, left = (h - fh * side) // 2, (w - fw * side) // 2
    out = np.empty((n, side * side * c), dtype=np.float32)
    for s in range(0, n, CHUNK):
        block = np.asarray(images[s : s + CHUNK])[:, top : top + fh * side, left : left + fw * side].astype(np.float32)
        block = block.reshape(len(block), side, fh, side, fw, c).mean(axis=(2, 4)) / 255.0
        out[s : s + len(block)] = block.reshape(len(block), -1)
    return out


def fold_count(labels: np.ndarray, classes: list[str], groups: np.ndarray, folds: int) -> int:
    """The folds to use: ``audit.folds``, lowered (with a warning) to the images of the smallest class and to
    the number of near-duplicate groups, since every training fold must hold every class. A small dataset
    is then still audited (and ``dvc repro`` does not stop at the audit); below 2 it cannot be."""
    counts = np.bincount(labels, minlength=len(classes))
    usable = min(folds, int(counts.min()), len(np.unique(groups)))
    if usable < 2:
        small = [f"{classes[i]} ({counts[i]})" for i in np.flatnonzero(counts < 2)] or ["(all in one near-duplicate group)"]
        raise StageError(f"the audit needs at least 2 train+val images per class to cross-fit; too few in {', '.join(small)}")
    if usable < folds:
        least = classes[int(np.argmin(counts))]
        warn(f"audit.folds: {folds} folds lowered to {usable} (smallest class {least}: {int(counts.min())} train+val "
             f"images; {len(np.unique(groups))} near-duplicate groups)")
    return usable


def model_steps(kind: str, ap: AuditParams, n_features: int, fold_rows: int, index: str = "exact") -> list:
    """The scikit-learn steps fitted per fold. ``pixels``: PCA (when set) then distance-weighted k-NN;
    ``knn``: k-NN on the embeddings (cosine = Euclidean on L2-normalised vectors, no PCA: they are already
    a compact, informative representation); ``logistic``: a multinomial logistic regression on them.
    *index* (:func:`cvpipe.audit.neighbors.knn_index`): the k-NN's neighbour search, scikit-learn's exact
    one or faiss's HNSW graph (:class:`~cvpipe.audit.neighbors.HNSWKNeighborsClassifier`)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    from cvpipe.audit.neighbors import HNSWKNeighborsClassifier

    if kind == "logistic":
        return [LogisticRegression(C=ap.regularization, max_iter=2000)]
    steps: list = []
    if kind == "pixels" and ap.pca_components is not None:
        # PCA cannot keep more dimensions than a training fold has images or features
        steps.append(PCA(n_components=min(ap.pca_components, n_features, fold_rows), random_state=ap.seed))
    k = min(ap.neighbors, fold_rows)
    knn = HNSWKNeighborsClassifier(n_neighbors=k) if index == "hnsw" else KNeighborsClassifier(n_neighbors=k, weights="distance")
    return steps + [knn]


def out_of_sample_probs(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, ap: AuditParams,
                        num_classes: int, folds: int, kind: str = "pixels", index: str = "exact") -> np.ndarray:
    """(N, num_classes) probabilities; row i comes from the model of the fold that held image i out.
    *kind*: ``pixels``, or ``audit.embedding_head`` (``logistic``/``knn``) for embeddings; *index*: the
    k-NN's search (``exact``/``hnsw``, :func:`model_steps`)."""
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    fold_rows = len(labels) - int(np.ceil(len(labels) / folds))  # the fewest images a model is fitted on
    steps = model_steps(kind, ap, features.shape[1], fold_rows, index)
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=ap.seed)
    probs = cross_val_predict(make_pipeline(*steps), features, labels, groups=groups, cv=cv, method="predict_proba")
    if probs.shape[1] != num_classes:  # every class is in every training fold (fold_count); guard the invariant
        raise StageError(f"internal error: {probs.shape[1]} probability columns for {num_classes} classes")
    return probs.astype(np.float64)
