"""The shared torch layer of the model-using stages (train, evaluate, serve, init's probe):
device and precision (:mod:`~cvpipe.torchkit.runtime`), timm model creation and checkpoints
(:mod:`~cvpipe.torchkit.models`), datasets, loaders and the on-device normalization
(:mod:`~cvpipe.torchkit.loaders`), the one forward/loss/mixup step (:mod:`~cvpipe.torchkit.step`)
and the one evaluation pass (:mod:`~cvpipe.torchkit.evaluation`). It imports the core and the
data layer, never a stage."""
