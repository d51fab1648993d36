"""Experiment configs: `python -m trainer.main --config=configs/<name>.py`; importable as `configs.<name>`."""
