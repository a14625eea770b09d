"""``cvpipe preprocess``: resize, leakage-aware split (:mod:`~cvpipe.preprocess.splits`), the
memory-mapped training format and the dataset card (:mod:`~cvpipe.preprocess.datacard`);
the stage itself is :mod:`cvpipe.preprocess.stage`."""
