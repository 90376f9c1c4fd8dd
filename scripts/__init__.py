"""The project's Python tools, a package: run each one as a module from the repository root,
e.g. `venv/bin/python -m scripts.bench.generate --help` (the venv: `scripts/requirements.txt`).

- `fixtures/`: the generators of the parity fixtures (`tests/fixtures/`) and of `weights/tiny`,
  with diffusers and transformers as the reference;
- `bench/`: the benchmarks against diffusers and of the scale-out mode (and the child processes
  they time);
- `checks/`: the module graph check `scripts/test.sh` runs, and the load and abuse checks of a
  live server (stdlib only);
- `common/`: modules the others import and never run: the processes of a live deployment
  (`nodes`, also used by `tests/cluster/cluster_test.py`), the tiny tokenizers, the TeaCache
  reference.

The shell scripts at this level are the test entry points (`test.sh` is the one CI runs) and the
CUDA setup and GPU check.
"""
