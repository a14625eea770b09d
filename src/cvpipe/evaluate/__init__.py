"""``cvpipe evaluate``: test metrics and plots (:mod:`cvpipe.evaluate.stage`,
:mod:`~cvpipe.evaluate.metrics`) and the TorchScript/ONNX export with parity checks
(:mod:`~cvpipe.evaluate.export`)."""
