"""Several concepts in one model and one image (Mix-of-Show, Gu et al. NeurIPS 2023): per-layer least-squares
fusion of concept adapters and region-restricted cross-attention."""
