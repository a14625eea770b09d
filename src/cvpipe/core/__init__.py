"""The core every layer stands on: params (pydantic), storage (local or ``gs://``, atomic writes),
errors, the console and W&B tracking. It imports nothing else of cvpipe and never imports torch."""
