"""Importable code behind `make demo` and `benchmarks/study.py`: data, pretraining arms, frozen-feature evaluation."""
