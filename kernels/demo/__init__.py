"""The demo world: procedurally generated captioned scenes, personal concepts, the demo model and its evaluator."""
