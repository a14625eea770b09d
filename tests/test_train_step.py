"""The shared training step (cvpipe.torchkit.step) and evaluation pass (cvpipe.torchkit.evaluation).

The train loop, the LR finder and the budget probe share :func:`forward_loss`; train's validation
and evaluate's predictions share :func:`evaluate`. These tests pin both to the code they replaced,
op for op (bit-identical tensors), at the machine's own precision (bf16 autocast where the CPU has
it), and pin the odd-batch rule of mixup.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cvpipe.torchkit.evaluation import array_batches, evaluate
from cvpipe.torchkit.loaders import BatchNormalizer
from cvpipe.torchkit.runtime import autocast, resolve_runtime
from cvpipe.torchkit.step import forward_loss

CLASSES = 4


@pytest.fixture(scope="module")
def rt():
    return resolve_runtime("cpu", "auto", True)


@pytest.fixture(scope="module")
def model():
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=CLASSES)


def _batch(n: int, seed: int = 0):
    g = np.random.default_rng(seed)
    images = torch.from_numpy(g.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8))
    labels = torch.as_tensor(g.integers(0, CLASSES, size=n), dtype=torch.long)
    return images, labels


def _normalizer(rt):
    return BatchNormalizer([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], rt)


def _mixup(alpha: float = 0.4):
    from timm.data import Mixup

    return Mixup(mixup_alpha=alpha, cutmix_alpha=0.0, prob=1.0, label_smoothing=0.1, num_classes=CLASSES)


def test_forward_loss_is_the_train_loops_step(model, rt):
    """Normalize, forward under autocast, criterion on the float32 logits: the loop's former inline code."""
    model.train()
    images, labels = _batch(8)
    normalize, criterion = _normalizer(rt), torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    torch.manual_seed(1)
    fwd = forward_loss(model, images, labels, normalize, criterion, None, rt)
    torch.manual_seed(1)
    x, y = normalize(images), labels.to(rt.device)
    with autocast(rt):
        logits = model(x)
        loss = criterion(logits.float(), y)
    assert torch.equal(fwd.loss, loss) and torch.equal(fwd.logits, logits) and torch.equal(fwd.labels, y)
    assert fwd.loss.requires_grad


def test_forward_loss_mixes_even_batches_as_timm_does(model, rt):
    from timm.loss import SoftTargetCrossEntropy

    model.train()
    images, labels = _batch(8)
    normalize, criterion, mixup = _normalizer(rt), SoftTargetCrossEntropy(), _mixup()
    np.random.seed(3)
    fwd = forward_loss(model, images, labels, normalize, criterion, mixup, rt)
    np.random.seed(3)
    x, target = mixup(normalize(images), labels)
    with autocast(rt):
        loss = criterion(model(x).float(), target)
    assert torch.equal(fwd.loss, loss)
    assert torch.equal(fwd.labels, labels)  # accuracy is counted on the unmixed labels


def test_forward_loss_leaves_an_odd_batch_unmixed_with_soft_targets(model, rt):
    """timm's Mixup cannot pair an odd batch: it is not mixed (no mixup random draw), and its targets are the
    label-smoothed one-hot soft targets Mixup gives an unmixed batch, so the soft-target loss still applies."""
    from timm.data.mixup import mixup_target
    from timm.loss import SoftTargetCrossEntropy

    model.train()
    images, labels = _batch(7)
    normalize, criterion, mixup = _normalizer(rt), SoftTargetCrossEntropy(), _mixup()
    np.random.seed(5)
    fwd = forward_loss(model, images, labels, normalize, criterion, mixup, rt)
    after = np.random.random()
    np.random.seed(5)
    assert after == np.random.random()  # Mixup drew nothing
    with autocast(rt):
        loss = criterion(model(normalize(images)).float(), mixup_target(labels, CLASSES, 1.0, 0.1))
    assert torch.isfinite(fwd.loss) and torch.equal(fwd.loss, loss)
    with pytest.raises(AssertionError, match="even"):  # what the loop met before
        mixup(normalize(images), labels)


def _old_predict(model, images, normalize, rt, batch_size):
    """evaluate.stage.predict's logits before the shared pass (reference)."""
    model.eval()
    logits = []
    with torch.inference_mode(), autocast(rt):
        for s in range(0, len(images), batch_size):
            x = normalize(torch.from_numpy(np.array(images[s : s + batch_size])))
            logits.append(model(x).float().cpu())
    return torch.cat(logits).numpy()


def _old_eval_sums(model, loader, normalize, rt, criterion):
    """train.stage._eval_sums before the shared pass (reference)."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    correct = torch.zeros((), dtype=torch.int64, device=rt.device)
    total = 0
    with torch.inference_mode(), autocast(rt):
        for images, labels in loader:
            x = normalize(images)
            y = labels.to(rt.device, non_blocking=True)
            logits = model(x).float()
            loss_sum += criterion(logits, y).double() * len(y)
            correct += (logits.argmax(1) == y).sum()
            total += len(y)
    return [float(loss_sum), float(correct), float(total)]


def test_evaluation_pass_writes_evaluates_logits_bit_for_bit_into_the_callers_array(model, rt):
    images = _batch(23, seed=7)[0].numpy()
    normalize = _normalizer(rt)
    out = np.full((23, model.num_classes), np.nan, dtype=np.float32)
    result = evaluate(model, array_batches(images, 8), normalize, rt, logits_out=out)
    logits = _old_predict(model, images, normalize, rt, 8)
    assert result.logits is out and np.array_equal(out, logits)
    assert result.count == 0 and result.loss_sum == 0.0  # unlabelled batches: no sums
    with pytest.raises(ValueError, match="held 23 images, logits_out has 24 rows"):
        evaluate(model, array_batches(images, 8), normalize, rt, logits_out=np.zeros((24, model.num_classes), dtype=np.float32))


def test_evaluation_pass_gives_trains_validation_sums_bit_for_bit(model, rt):
    batches = [_batch(16, seed=1), _batch(16, seed=2), _batch(5, seed=3)]
    normalize, criterion = _normalizer(rt), torch.nn.CrossEntropyLoss()
    result = evaluate(model, batches, normalize, rt, criterion)
    assert result.sums() == _old_eval_sums(model, batches, normalize, rt, criterion)
    assert result.count == 37 and result.logits is None and not model.training
