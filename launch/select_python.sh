# Sourced by multinode.sh and slurm.sbatch: the interpreter to train with.
# PYTHON if set, else the repository's .venv, else python3 on PATH (the Docker image's /opt/venv).
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python
  else
    PYTHON=$(command -v python3 || true)
  fi
fi
if [ -z "$PYTHON" ]; then
  echo "llark: no Python found; set PYTHON to the interpreter of the environment llark is installed in" >&2
  exit 1
fi
export PYTHON
