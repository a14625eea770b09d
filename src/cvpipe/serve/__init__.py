"""``cvpipe serve``: a trained model behind a JSON API and a web page (FastAPI + uvicorn).

* :mod:`cvpipe.serve.model` loads a promoted model folder or a bare train
  checkpoint (local or ``gs://``) and runs the evaluation preprocessing (no torch import);
  the model runs in :mod:`cvpipe.serve.onnx_backend` (ONNX Runtime, a uint8-pixel model.onnx)
  or :mod:`cvpipe.serve.torch_backend` (torch eager, imported only when chosen), with
  :mod:`cvpipe.serve.batching` batching requests that arrive together;
* :mod:`cvpipe.serve.app` builds the FastAPI app (``/predict``, ``/model``,
  ``/healthz``, the page in ``static/``); :mod:`cvpipe.serve.abstain` resolves the model's temperature
  and the "unsure" rule (``serve.abstain_below``);
* :mod:`cvpipe.serve.guards`: idle/slow-header timeouts, the cap on requests in progress,
  refusal of ambiguous framing; :mod:`cvpipe.serve.memory`: freed image memory back to the
  system; :mod:`cvpipe.serve.remote`: remote models cached per version, URLs redacted.
"""

from cvpipe.serve.model import ServedModel, load_model

__all__ = ["ServedModel", "load_model"]
