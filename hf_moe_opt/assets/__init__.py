"""Small trained MoE checkpoints shipped with the package (offline defaults for demos and evals)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

SHIPPED_MODELS = {
    "switch-tiny-ddtp": "Switch Transformers, 8 experts, span-corruption LM on English Debian descriptions",
    "nllb-moe-tiny-ddtp": "NLLB-MoE, 8 experts top-2, English->German on Debian descriptions",
    "qwen3-moe-tiny-ddtp": "Qwen3-MoE causal LM, 8 experts top-2, next-token LM on English Debian descriptions",
}


def shipped_model_path(name: str) -> Path:
    """Path of a shipped checkpoint folder (loadable with ``from_pretrained``)."""
    if name not in SHIPPED_MODELS:
        raise ValueError(f"unknown shipped model {name!r}; shipped: {', '.join(SHIPPED_MODELS)}")
    path = _HERE / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"shipped model {name!r} is missing from {path} (broken install?)")
    return path
