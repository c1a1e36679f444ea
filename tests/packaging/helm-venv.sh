#!/usr/bin/env bash
# Makes a Python virtualenv with the real Helm engine for the chart tests:
# helm-sdkpy (Helm v4 built as a shared library, from PyPI) and PyYAML.
# Usage: helm-venv.sh DIR   -> prints DIR/bin/python once it is ready.
# Idempotent and concurrency-safe (flock); the first run downloads ~50 MB.
#
# helm-sdkpy declares Python >= 3.12. We look for one (python3.1[2-9] on
# PATH, pyenv's versions, Debian's python3 when it is new enough); Debian 12
# ships 3.11, and there the package is installed with --ignore-requires-python:
# its code needs nothing newer (measured with 3.11.2) and the engine is Go.
set -euo pipefail

dir=${1:?usage: helm-venv.sh DIR}
HELM_SDKPY=helm-sdkpy==0.1.32
PYYAML=PyYAML==6.0.3
stamp="$dir/.ready-$HELM_SDKPY-$PYYAML"

mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9

if [ -e "$stamp" ] && "$dir/bin/python" -c 'import helm_sdkpy, yaml' 2>/dev/null; then
	echo "$dir/bin/python"
	exit 0
fi

newer_than() { # python major.minor
	"$1" -c "import sys; sys.exit(0 if sys.version_info >= ($2) else 1)" 2>/dev/null
}

python=
candidates=()
for v in 3.13 3.12; do
	p=$(command -v "python$v" 2>/dev/null || true)
	[ -z "$p" ] || candidates+=("$p")
done
pyenv_root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
for p in "$pyenv_root"/versions/3.1[2-9]*/bin/python3; do
	[ -x "$p" ] && candidates+=("$p")
done
candidates+=(/usr/bin/python3)
for p in "${candidates[@]}"; do
	if newer_than "$p" "3, 12" && "$p" -c 'import venv, ensurepip' 2>/dev/null; then
		python=$p
		break
	fi
done
pip_flags=()
if [ -z "$python" ]; then
	python=/usr/bin/python3
	pip_flags+=(--ignore-requires-python)
	if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
		echo "helm-venv: no Python >= 3.12 and $python has no venv module (apt-get install python3-venv)" >&2
		exit 1
	fi
fi

echo "helm-venv: creating $dir with $python ($("$python" --version 2>&1))" >&2
rm -rf "$dir"
"$python" -m venv "$dir"
"$dir/bin/python" -m pip install --quiet --disable-pip-version-check "${pip_flags[@]}" "$HELM_SDKPY" "$PYYAML" >&2
"$dir/bin/python" -c 'import helm_sdkpy, yaml; from helm_sdkpy import _ffi; print("helm-venv:", _ffi.get_version())' >&2
touch "$stamp"
echo "$dir/bin/python"
