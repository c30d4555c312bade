"""Augmentation of a few training photos (issue 14): settings and presets, the per-step view policy, and
multi-concept composition."""

from .compose import Subject, compose_subjects
from .settings import PRESETS, AugmentSettings, preset
from .views import Augmenter, Views

__all__ = ["PRESETS", "AugmentSettings", "Augmenter", "Subject", "Views", "compose_subjects", "preset"]
