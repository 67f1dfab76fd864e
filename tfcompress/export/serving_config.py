"""TF Serving's model list, `saved_models/models.config` (ModelServerConfig in protobuf text format).

`update_models_config(base_dir, name)` adds or updates the entry NAME so that
`tensorflow_model_server --model_config_file=saved_models/models.config` serves BASE_DIR/NAME. The file is read
and written with TF Serving's own proto (`tensorflow_serving.config.model_server_config_pb2`) and protobuf's text
format, so every entry and field tfcompress does not set (other models, version policies, labels, logging
config) is kept; comments are not (the file is rewritten).

tensorflow-serving-api is required by export (here and for the warm-up requests of
`tfcompress.export.signatures`). It declares a dependency on the full `tensorflow` wheel, which would be installed
beside `tensorflow-cpu` (two TensorFlows in one environment), so it is not in setup.cfg's extras: install it
without dependencies, as the Makefile does (`pip install --no-deps tensorflow-serving-api==2.21.0`, the release
matching TensorFlow's); what it needs at run time (protobuf, TensorFlow's protos) comes with TensorFlow.
"""

import os
import re

from tfcompress._files import write_atomically

SERVING_API_MISSING = (
    "tfcompress.export needs tensorflow-serving-api (TF Serving's ModelServerConfig and PredictRequest protos, for "
    "models.config and the warm-up requests), which is not installed. It declares a dependency on the full "
    "`tensorflow` wheel, which would land beside tensorflow-cpu, so install it without dependencies, in the "
    "release matching TensorFlow's: pip install --no-deps tensorflow-serving-api==2.21.0 (`make install` does)"
)

try:
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2
except ImportError as error:
    raise ImportError(SERVING_API_MISSING) from error

MODELS_CONFIG_FILE = "models.config"
MODEL_PLATFORM = "tensorflow"

# TF Serving model names end up in URLs (/v1/models/NAME) and directory names.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_model_name(name):
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
        raise ValueError(f"name must be letters, digits, '_', '.' or '-' (starting with a letter or digit), "
                         f"got {name!r}")
    return name


def read_models_config(path):
    """The ModelServerConfig in the text file `path` (an empty one when the file does not exist).

    Raises:
        ValueError: the file is not a ModelServerConfig in text format (naming the file, line and column).
    """
    config = model_server_config_pb2.ModelServerConfig()
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
        try:
            text_format.Parse(text, config)
        except text_format.ParseError as error:
            raise ValueError(f"{path} is not a valid ModelServerConfig (text format): {error}") from None
    return config


def set_model_entry(config, name, base_path, platform=MODEL_PLATFORM):
    """Add or update the `config { name: NAME ... }` entry of a ModelServerConfig (in place); returns `config`.

    An existing entry keeps its other fields (version policy, labels, ...); only base_path and model_platform are
    set. A new entry goes after the existing ones.

    Raises:
        ValueError: the config lists its models another way (custom_model_config).
    """
    if config.WhichOneof("config") == "custom_model_config":
        raise ValueError("models.config uses custom_model_config; tfcompress only edits model_config_list")
    entries = config.model_config_list.config  # selects model_config_list (an empty one when it is not set)
    entry = next((entry for entry in entries if entry.name == name), None)
    if entry is None:
        entry = entries.add()
        entry.name = name
    entry.base_path = base_path
    entry.model_platform = platform
    return config


def update_models_config(base_dir, name, base_path=None):
    """Add or update NAME in BASE_DIR/models.config (created when missing); returns the file's path.

    Args:
        base_dir: the TF Serving model base (saved_models/).
        name: the model name.
        base_path: the directory TF Serving reads versions from. TF Serving requires an absolute path (or URI),
            so the default is the absolute path of BASE_DIR/NAME on this machine; pass e.g. "/models/NAME" when
            the server sees the directory elsewhere (a container mount).

    Other models' entries and fields are kept; comments are not (the file is rewritten, atomically).

    Raises:
        ValueError: the file does not parse as a ModelServerConfig (naming it), or uses custom_model_config.
    """
    check_model_name(name)
    path = os.path.join(base_dir, MODELS_CONFIG_FILE)
    base_path = base_path or os.path.abspath(os.path.join(base_dir, name))
    config = read_models_config(path)
    try:
        set_model_entry(config, name, base_path)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    os.makedirs(base_dir, exist_ok=True)
    write_atomically(path, text_format.MessageToString(config))
    return path
