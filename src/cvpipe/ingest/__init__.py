"""``cvpipe ingest``: list a source, validate every image, store the good ones content-addressed
with a manifest, quarantine the rest with reasons (:mod:`cvpipe.ingest.stage`)."""
