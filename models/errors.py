"""Error types of `models/`: each names the file or value at fault, never a deep traceback."""


class ModelError(ValueError):
    """Base class of every error that bad model input (paths, files, configs) raises."""


class ConfigError(ModelError):
    """A model config value is missing, of the wrong type, or inconsistent."""


class CheckpointError(ModelError):
    """A checkpoint file or directory is missing, truncated, corrupt, or does not fit the config."""


class TokenizerError(ModelError):
    """A tokenizer file is missing or unusable, or a chat template cannot be rendered."""


class UnknownModelError(ModelError):
    """A model name or path resolves to nothing loadable."""
