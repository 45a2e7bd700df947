"""The engine: model loading, LoRA, training, generation, search and candidate scoring (torch)."""
