"""``cvpipe train``: fine-tune a timm model. :mod:`cvpipe.train.stage` runs the loop from named
pieces: setup (:mod:`~cvpipe.train.build`: data, model, optimizer, resume), one epoch and
validation (:mod:`~cvpipe.train.epoch`), early stopping (:mod:`~cvpipe.train.early_stop`),
resumable checkpoints (:mod:`~cvpipe.train.checkpoint`), the time budget
(:mod:`~cvpipe.train.budget` rules, :mod:`~cvpipe.train.budget_run` probe and re-plans), the
optimizer and schedule (:mod:`~cvpipe.train.finetune`), DDP (:mod:`~cvpipe.train.distributed`)
and the LR finder (:mod:`~cvpipe.train.lr_finder`)."""
