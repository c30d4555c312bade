"""Command line: ``python -m fewshot_personalize {train,generate,demo,evaluate,bench}``."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
