"""Scripts and shared builders for the multi-process tests (run by torchrun from tests/test_distributed.py)."""
