"""Importable code behind `make demo` and `study/sensitivity.py`: data, pretraining arms, frozen-feature evaluation."""
