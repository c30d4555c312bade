"""The ComfyUI back end: the engine's seams over ComfyUI's MODEL / CLIP / VAE, their patches, the diffusers-folder
loader, and what nodes share (the adapter socket, image conversion)."""
