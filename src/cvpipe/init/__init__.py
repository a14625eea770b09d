"""``cvpipe init SOURCE``: profile a dataset and this machine (:mod:`cvpipe.init.stage`) and apply
the recipe's rules (:mod:`~cvpipe.init.recipe`) to write a params.yaml."""
