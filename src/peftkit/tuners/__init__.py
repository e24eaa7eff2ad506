"""One folder per PEFT method (`config.py`, `layer.py`, `model.py`) on the shared core in `_core/`."""
