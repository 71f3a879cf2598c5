"""The errors convllava-edge raises for bad input.

Every user-facing failure is one of these; the CLI prints ``str(error)`` as one line and exits
non-zero, so messages name the file or value and carry the numbers ("expected X, got Y").
Programming errors stay ordinary exceptions and keep their tracebacks.
"""


class ConvLlavaEdgeError(Exception):
    """Base class: a problem with the user's input, files or environment."""

    exit_code = 1


class CheckpointError(ConvLlavaEdgeError):
    """A checkpoint folder, shard, index or config that cannot be used."""


class ImageError(ConvLlavaEdgeError):
    """An image file that cannot be read, or one that is unsafe to decode."""


class BundleError(ConvLlavaEdgeError):
    """A bundle whose manifest or files are missing, altered or unsafe."""


class ExportError(ConvLlavaEdgeError):
    """An export that could not be completed or failed its own validation."""


class ConfigError(ConvLlavaEdgeError):
    """An option value that is out of range or unknown."""


def unknown_choice(what: str, value: object, choices) -> ConfigError:
    """'unknown projector type 'mlp3x_relu' (known: linear, mlp2x_gelu)'."""
    return ConfigError(f"unknown {what} {value!r} (known: {', '.join(map(str, choices))})")
