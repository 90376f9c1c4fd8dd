"""The Python halves of scripts/gpu_check.sh (stdlib only, any Python 3):

  python3 -m scripts.checks.gpu_check site-packages   this interpreter's site-packages folders, one
                                                       a line (gpu_check.sh runs it with every Python
                                                       environment it finds, to look for the CUDA
                                                       libraries of NVIDIA's wheels there)
  ... | python3 -m scripts.checks.gpu_check test-binaries
                                                       cargo's JSON messages (`cargo test --no-run
                                                       --message-format=json`) on stdin -> one line
                                                       `NAME EXECUTABLE` per integration test binary

Run from the repository root (gpu_check.sh is).
"""
import json
import site
import sys
import sysconfig


def site_packages() -> None:
    print("\n".join(site.getsitepackages() + [sysconfig.get_paths()["purelib"]]))


def test_binaries() -> None:
    for line in sys.stdin:
        m = json.loads(line)
        if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
            print(m["target"]["name"] + " " + m["executable"])


def main() -> None:
    commands = {"site-packages": site_packages, "test-binaries": test_binaries}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit("usage: python3 -m scripts.checks.gpu_check site-packages | test-binaries")
    commands[sys.argv[1]]()


if __name__ == "__main__":
    main()
