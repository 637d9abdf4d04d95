#!/usr/bin/env bash
# The main job: set up .venv if needed, then build the icon dataset and print its summary.
set -euo pipefail
source "$(dirname "$0")/env.sh" serve
cd "$root"
duomodal data icons work/icons "$@"
duomodal data check work/icons
