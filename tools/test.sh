#!/usr/bin/env bash
# The test command: set up (including the MinkowskiEngine build, cached after the first time), then pytest.
# Extra arguments go to pytest (e.g. `bash tools/test.sh tests/test_agreement.py -x`, or `--runslow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec "${FCMAE_VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider "$@"
