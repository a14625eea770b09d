"""``cvpipe train``: fine-tune a timm model (:mod:`cvpipe.train.stage`), with its optimizer and
schedule (:mod:`~cvpipe.train.finetune`), time budget (:mod:`~cvpipe.train.budget`), resumable
checkpoints (:mod:`~cvpipe.train.checkpoint`), DDP (:mod:`~cvpipe.train.distributed`) and the
LR finder (:mod:`~cvpipe.train.lr_finder`)."""
