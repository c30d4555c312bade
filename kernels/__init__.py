"""The engine: everything that does not need ComfyUI. Never imports comfy, folder_paths or nodes."""
