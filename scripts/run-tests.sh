#!/usr/bin/env bash
# The whole test suite: set up .venv with the dev extras if needed, then run pytest.
set -euo pipefail
source "$(dirname "$0")/env.sh" dev
cd "$root"
# The browser test drives Debian's Chromium (never a Playwright-downloaded browser); without it
# that one test is skipped and says why.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "duomodal: installing Debian's chromium for the browser test" >&2
    { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
        || echo "duomodal: could not install chromium; the browser test will be skipped" >&2
fi
# The OCR engine tests also run Debian's tesseract (the other engine, rapidocr, comes with the dev
# extra); without it those tests are skipped and say why.
if ! command -v tesseract >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "duomodal: installing Debian's tesseract-ocr for the OCR engine tests" >&2
    { apt-get update -qq && apt-get install -y -qq tesseract-ocr tesseract-ocr-eng >/dev/null; } \
        || echo "duomodal: could not install tesseract-ocr; its tests will be skipped" >&2
fi
python -m pytest -q "$@"
