#!/usr/bin/env bash
# Sets up everything on a fresh machine with only Python 3, then runs one job:
#   ./bootstrap.sh demo [demo args]     the main job on built-in phantoms (nnunet-protokd demo)
#   ./bootstrap.sh test [pytest args]   the test suite (CPU, two pytest-xdist workers; PROTOKD_TEST_WORKERS=0 runs
#                                       it in one process)
#   ./bootstrap.sh lint                 ruff and the import-linter contracts of pyproject.toml (CI runs it first)
#   ./bootstrap.sh install              only the set-up
# The set-up: a virtual environment in .venv (override with PROTOKD_VENV), this project installed into it in
# editable mode with nnU-Net v2, PyTorch and Snakemake (the extra [cluster], which the workflow tests need), and
# the .pth hook that lets nnUNetv2_train/nnUNetv2_predict of that environment find trainers/ (see
# nnunet_protokd/trainer_path.py). It is redone whenever setup.cfg changes.
set -euo pipefail
cd "$(dirname "$0")"
venv="${PROTOKD_VENV:-.venv}"
stamp="$venv/.nnunet_protokd_installed"

if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
    echo "== setting up $venv (first run: a few minutes; PyTorch is large)"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet -e '.[test,cluster]'
    "$venv/bin/nnunet-protokd" register-trainers
    touch "$stamp"
fi

job="${1:-}"
[ $# -gt 0 ] && shift
case "$job" in
    test)
        # threads and nnU-Net's processes per test: tests/conftest.py shares the cores among the workers
        # two workers, each a whole test module at a time (a module's trained models are its fixture), in the
        # order conftest.py gives (longest first): the suite is mostly single-threaded imports and nnU-Net's
        # start-up, so two modules side by side use the 2 cores that one leaves half idle
        workers="${PROTOKD_TEST_WORKERS:-2}"
        exec "$venv/bin/python" -m pytest -n "$workers" --dist loadfile --no-loadscope-reorder "$@" ;;
    demo) exec "$venv/bin/nnunet-protokd" demo "$@" ;;
    lint) "$venv/bin/ruff" check . && "$venv/bin/lint-imports" ;;
    install) echo "ready: $venv/bin/nnunet-protokd, $venv/bin/nnUNetv2_train, ..." ;;
    *) echo "usage: $0 demo [args] | test [pytest args] | lint | install" >&2; exit 2 ;;
esac
