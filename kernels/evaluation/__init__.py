"""DreamBooth's and CatVersion's evaluation on local models: CLIP-I, CLIP-T, DINO, their masked variants, PRES and
DIV (DreamBooth arXiv 2208.12242 §4.1 and §4.3; CatVersion arXiv 2311.14631, masked CLIP-I). Nothing is downloaded."""

from .feature_models import ClipFolderModel, DinoFolderModel, ImageFeatureModel, load_clip, load_dino
from .image_sets import ImageSet
from .report import metrics_table
from .scoring import score

__all__ = ["ClipFolderModel", "DinoFolderModel", "ImageFeatureModel", "ImageSet", "load_clip", "load_dino",
           "metrics_table", "score"]
