# Sourced by run-main.sh and run-tests.sh: create or reuse .venv and install duomodal into it.
# torch is pinned in constraints.txt: a bare `torch` would pull a multi-GB CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DUOMODAL_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    echo "duomodal: creating virtual environment in $venv" >&2
    "$python" -m venv "$venv"
fi
extras="${1:-serve}"
stamp="$venv/.duomodal-installed-$extras"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "$root/constraints.txt" -nt "$stamp" ]; then
    echo "duomodal: installing duomodal[$extras] and its dependencies" >&2
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -c "$root/constraints.txt" torch==2.13.0
    "$venv/bin/python" -m pip install --quiet -c "$root/constraints.txt" -e "$root[$extras]"
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
