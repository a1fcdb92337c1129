"""Benchmarks of stage 3 against HuggingFace baselines, and the reports built from their rows.

    python -m bench.e2e        PPO iterations per system -> one JSON row each (bench/rows.py)
    python -m bench.max_model  largest actor per memory option on this card -> rows
    python -m bench.report     reports/ (markdown + CSV tables, PNG plots, README index) from rows only
"""
