"""``cvpipe serve``: a trained model behind a JSON API and a web page (FastAPI + uvicorn).

* :mod:`cvpipe.serve.model` loads a promoted model folder or a bare train
  checkpoint (local or ``gs://``) and runs the evaluation preprocessing;
* :mod:`cvpipe.serve.app` builds the FastAPI app (``/predict``, ``/model``,
  ``/healthz``, the page in ``static/``).
"""

from cvpipe.serve.model import ServedModel, load_model

__all__ = ["ServedModel", "load_model"]
