"""The live Redis scale-out test (scripts/test_cluster.sh)."""
