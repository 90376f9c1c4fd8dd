"""Python test programs run by scripts/test_*.sh (a package so that they can run as modules from the
repository root and import scripts.common, e.g. `python -m tests.cluster.cluster_test`)."""
