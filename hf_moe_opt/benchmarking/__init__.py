"""Benchmarks on CUDA devices: MoE layer time vs the hardware floor, and whole-model throughput.

Run as ``hf-moe-opt bench layer|model ...`` or ``python benchmarks/bench_layer.py`` / ``bench_model.py``.
"""
