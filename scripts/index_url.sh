#!/usr/bin/env sh
# Print the package index URL this machine's pip already uses (a mirror, or pip's
# own default). Pipfile's [[source]] reads it from $PYPI_URL, so no index host is
# ever written into the project.
PY=${PYTHON:-python3}
url=$("$PY" -m pip config get global.index-url 2>/dev/null || true)
[ -n "$url" ] || url=${PIP_INDEX_URL:-}
[ -n "$url" ] || url=$("$PY" -c "from pip._internal.models.index import PyPI; print(PyPI.simple_url)")
echo "$url"
