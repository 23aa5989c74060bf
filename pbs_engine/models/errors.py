"""Errors raised while resolving and loading a model: each names the path, tensor or field at fault."""


class ModelLoadError(ValueError):
    """Base class for every error about a model the user pointed us at."""


class ModelNotFoundError(ModelLoadError):
    """The model directory, file or repo does not exist (or is not in the local cache)."""


class MissingShardError(ModelLoadError):
    """A shard named by model.safetensors.index.json is absent."""


class CorruptCheckpointError(ModelLoadError):
    """A safetensors file or its index is empty, truncated, or has a header that contradicts itself or the file."""


class MissingTensorError(ModelLoadError):
    """The checkpoint lacks a tensor the model needs."""


class UnexpectedTensorError(ModelLoadError):
    """The checkpoint holds a tensor the model has no place for."""


class ShapeMismatchError(ModelLoadError):
    """A checkpoint tensor's shape differs from the parameter it loads into."""


class UnsupportedDtypeError(ModelLoadError):
    """A checkpoint tensor that should be a weight is not floating point."""


class UnsupportedArchitectureError(ModelLoadError):
    """config.json names an architecture we do not implement."""


class InvalidConfigError(ModelLoadError):
    """config.json is missing, unreadable, or has a bad field."""


class InvalidTokenizerError(ModelLoadError):
    """tokenizer.json, tokenizer_config.json, generation_config.json or chat_template.jinja is unreadable or has a
    bad field."""
