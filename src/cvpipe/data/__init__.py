"""The torch-free shared layer: what stages hand each other and how images are read.

* :mod:`~cvpipe.data.images` decodes and validates image bytes; :mod:`~cvpipe.data.resize` fits them
  to the training size and hashes them (the app uses the very same functions);
* :mod:`~cvpipe.data.manifest` is the file format ingest writes and preprocess reads;
  :mod:`~cvpipe.data.prepared` is the memory-mapped format preprocess writes and train/evaluate read;
* :mod:`~cvpipe.data.sources` lists and fetches a source (folder, ``gs://``, archive, manifest,
  the built-in :mod:`~cvpipe.data.sample`);
* :mod:`~cvpipe.data.augment` builds albumentations pipelines from params.

Ingest and preprocess import only this layer and the core, so their images carry no torch."""
