"""The offline demo: tiny Llama models trained on toy skills, and their evaluation data."""
