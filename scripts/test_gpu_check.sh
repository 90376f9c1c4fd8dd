#!/usr/bin/env bash
# Checks `gpu_check.sh run`'s library discovery without a GPU: a stand-in `skyreels` that links a
# library found only in a Python environment's NVIDIA wheel folder (as PyTorch's CUDA 13 libraries
# are on the GPU machines) must be found and run, with every result written to the output folder;
# without that environment the run must stop, naming the library, before running anything.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

python3 -m venv env
site="$(env/bin/python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$site/nvidia/cu13/lib" link repo/scripts/checks repo/target/gpu-pack
echo 'int skyreels_fake_cuda(void) { return 13; }' > lib.c
cc -shared -fPIC -Wl,-soname,libskyreelsfakecuda.so.13 -o "$site/nvidia/cu13/lib/libskyreelsfakecuda.so.13" lib.c
ln -s "$site/nvidia/cu13/lib/libskyreelsfakecuda.so.13" link/libskyreelsfakecuda.so
printf '#include <stdio.h>\nint skyreels_fake_cuda(void);\nint main(int argc, char **argv) {\n  printf("stand-in %%d:", skyreels_fake_cuda());\n  for (int i = 1; i < argc; i++) printf(" %%s", argv[i]);\n  printf("\\n");\n  return 0;\n}\n' > main.c
cc -o skyreels main.c -Llink -lskyreelsfakecuda
# gpu_check.sh and the Python module it runs (scripts.checks.gpu_check)
cp "$ROOT/scripts/gpu_check.sh" "$ROOT/scripts/__init__.py" repo/scripts/
cp "$ROOT/scripts/checks/__init__.py" "$ROOT/scripts/checks/gpu_check.py" repo/scripts/checks/
gzip -c skyreels > repo/target/gpu-pack/skyreels.gz

fail() { echo "test_gpu_check: $*" >&2; exit 1; }

# found through the environment's python3 on PATH; bench flags pass through
(cd repo && PATH="$work/env/bin:$PATH" LD_LIBRARY_PATH= ./scripts/gpu_check.sh run "$work/out" --parts vae) >log 2>&1 ||
    { cat log; fail "run with the library in a wheel folder failed"; }
grep -q "found libskyreelsfakecuda.so.13 in $site/nvidia/cu13/lib" out/libraries.txt || fail "library not found in the wheel folder"
grep -q "stand-in 13: bench --parts vae" out/bench.txt || { cat out/bench.txt; fail "bench did not run with its flags"; }
grep -q "status 0" out/status.txt || fail "status is not 0"
[ -s out/env.txt ] || fail "no env.txt"

# without it: exit 3, the missing library named, nothing run
set +e
(cd repo && LD_LIBRARY_PATH= ./scripts/gpu_check.sh run "$work/out2") >log2 2>&1
rc=$?
set -e
[ "$rc" = 3 ] || { cat log2; fail "a missing library gave exit $rc, not 3"; }
grep -q "missing libraries: libskyreelsfakecuda.so.13" log2 || fail "the missing library is not named"
[ ! -e out2/bench.txt ] || fail "the bench ran although a library was missing"

# OUT_DIR is required
set +e
(cd repo && ./scripts/gpu_check.sh run --parts vae) >log3 2>&1
rc=$?
set -e
[ "$rc" = 2 ] || fail "run without OUT_DIR gave exit $rc, not 2"
echo "test_gpu_check: ok"
