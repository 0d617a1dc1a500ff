#!/usr/bin/env bash
# The test command: set up (including the MinkowskiEngine build, cached after the first time), then pytest.
# Extra arguments go to pytest (e.g. `bash tools/test.sh tests/test_agreement.py -x`, or `--runslow`).
# The suite runs in one worker process per core (pytest-xdist; FCMAE_TEST_WORKERS=N to choose, 0 for none), a
# test file's tests in one worker so its module fixtures (reference runs) are computed once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec "${FCMAE_VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider -n "${FCMAE_TEST_WORKERS:-auto}" --dist loadfile "$@"
