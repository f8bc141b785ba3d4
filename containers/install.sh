#!/usr/bin/env bash
# Install ESA's pinned dependencies and the package itself into the Python given as $1.
# The one install step shared by `make setup`, CI (.ci/run through make) and the Apptainer
# recipe (containers/esa.def), so CI exercises the image's install logic on every run.
#   containers/install.sh PYTHON [--test] [--editable]
set -euo pipefail
py=${1:?usage: install.sh PYTHON [--test] [--editable]}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
reqs="$here/requirements.txt"
editable=""
for a in "$@"; do
  case "$a" in
    --test) reqs="$here/requirements-test.txt" ;;
    --editable) editable="-e" ;;
    *) echo "install.sh: unknown option $a" >&2; exit 2 ;;
  esac
done
"$py" -m pip install --quiet --disable-pip-version-check -r "$reqs"
# --no-deps: everything was pinned above; the package adds no unpinned requirement.
"$py" -m pip install --quiet --disable-pip-version-check --no-deps $editable "$here"
