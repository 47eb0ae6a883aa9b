#!/usr/bin/env bash
# Run the Keras tests once per Keras backend, each in its own pytest process (Keras fixes its backend
# at import). Usage: tests/keras/run_backends.sh [pytest args...]; BACKENDS="jax torch" to choose.
set -u
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-.venv/bin/python}"
status=0
for backend in ${BACKENDS:-torch tensorflow jax}; do
  echo "== Keras tests, backend $backend"
  KERAS_BACKEND="$backend" "$PYTHON" -m pytest tests/keras -q "$@" || status=1
done
exit $status
