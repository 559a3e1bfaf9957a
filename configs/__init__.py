"""ml_collections config files, one `get_config()` per method (`--config=configs/NAME.py`)."""
