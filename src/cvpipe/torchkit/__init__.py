"""The shared torch layer of the model-using stages (train, evaluate, serve, init's probe):
device and precision (:mod:`~cvpipe.torchkit.runtime`), timm model creation and checkpoints
(:mod:`~cvpipe.torchkit.models`). It imports the core and the data layer, never a stage."""
