#!/usr/bin/env bash
# The main job: set up .venv if needed, then `duomodal demo`: build the icon dataset, train the
# VAE, DALL-E and CLIP (quick presets), index the icons, write the evaluation report and start the
# web app. Arguments go to `duomodal demo` (e.g. --no-serve, --preset seed, --limit 500).
set -euo pipefail
source "$(dirname "$0")/env.sh" serve
cd "$root"
exec duomodal demo "$@"
