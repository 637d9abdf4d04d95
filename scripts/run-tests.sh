#!/usr/bin/env bash
# The whole test suite: set up .venv with the dev extras if needed, then run pytest.
set -euo pipefail
source "$(dirname "$0")/env.sh" dev
cd "$root"
python -m pytest -q "$@"
