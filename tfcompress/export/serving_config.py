"""TF Serving's model list, `saved_models/models.config` (ModelServerConfig in protobuf text format).

`update_models_config(base_dir, name)` adds or updates the entry NAME so that
`tensorflow_model_server --model_config_file=saved_models/models.config` serves BASE_DIR/NAME.
"""

import os
import re

from tfcompress._files import write_atomically

MODELS_CONFIG_FILE = "models.config"

# TF Serving model names end up in URLs (/v1/models/NAME) and directory names.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_model_name(name):
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
        raise ValueError(f"name must be letters, digits, '_', '.' or '-' (starting with a letter or digit), "
                         f"got {name!r}")
    return name


# A small reader and writer for protobuf text format, enough to edit TF Serving's ModelServerConfig while keeping
# every field it does not touch (version policies, labels, logging config) exactly as the user wrote it.
# tensorflow-serving-api is not a dependency (it requires the full `tensorflow` package, which conflicts with
# tensorflow-cpu); when it is importable, `update_models_config` also parses the result with its real proto.
_TOKEN = re.compile(r"""\s+|\#[^\n]*|(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')|(?P<punct>[{}<>:,;\[\]])|"""
                    r"""(?P<word>[A-Za-z0-9_.+\-]+)""")


def _tokenize(text):
    tokens, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            line = text.count("\n", 0, position) + 1
            raise ValueError(f"models.config line {line}: cannot read {text[position:position + 20]!r}")
        if match.lastgroup is not None:
            line = text.count("\n", 0, position) + 1
            tokens.append((match.group(match.lastgroup), line))
        position = match.end()
    return tokens


def parse_text_proto(text):
    """Protobuf text format -> [(field, value)], value a raw scalar token (strings keep their quotes) or a list.

    Raises:
        ValueError: the text is not well-formed text format (naming the line).
    """
    tokens = _tokenize(text)
    position = 0

    def expect_value(field, line):
        nonlocal position
        if position >= len(tokens):
            raise ValueError(f"models.config line {line}: field {field!r} has no value")
        token, token_line = tokens[position]
        if token in ("{", "<"):
            position += 1
            return parse_message("}" if token == "{" else ">", token_line)
        if token in "}>:,;[]" and len(token) == 1:
            raise ValueError(f"models.config line {token_line}: unexpected {token!r} after {field!r}")
        position += 1
        while position < len(tokens) and tokens[position][0][0] in "\"'" and token[0] in "\"'":
            token = token[:-1] + tokens[position][0][1:]  # adjacent string literals concatenate
            position += 1
        return token

    def parse_message(closing, open_line):
        nonlocal position
        fields = []
        while True:
            if position >= len(tokens):
                if closing is None:
                    return fields
                raise ValueError(f"models.config: the message opened on line {open_line} is never closed")
            token, line = tokens[position]
            if token == closing:
                position += 1
                return fields
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", token):
                raise ValueError(f"models.config line {line}: expected a field name, got {token!r}")
            position += 1
            has_colon = position < len(tokens) and tokens[position][0] == ":"
            if has_colon:
                position += 1
            if position < len(tokens) and tokens[position][0] == "[":
                position += 1
                while position < len(tokens) and tokens[position][0] != "]":
                    fields.append((token, expect_value(token, line)))
                    if position < len(tokens) and tokens[position][0] == ",":
                        position += 1
                if position >= len(tokens):
                    raise ValueError(f"models.config line {line}: list of {token!r} is never closed")
                position += 1
            else:
                if not has_colon and (position >= len(tokens) or tokens[position][0] not in ("{", "<")):
                    raise ValueError(f"models.config line {line}: expected ':' or '{{' after {token!r}")
                fields.append((token, expect_value(token, line)))
            if position < len(tokens) and tokens[position][0] in (",", ";"):
                position += 1

    return parse_message(None, 1)


def format_text_proto(fields, indent=0):
    """[(field, value)] -> protobuf text format (two-space indentation, one field per line)."""
    lines = []
    pad = "  " * indent
    for name, value in fields:
        if isinstance(value, list):
            lines.append(f"{pad}{name} {{")
            body = format_text_proto(value, indent + 1)
            if body:
                lines.append(body.rstrip("\n"))
            lines.append(f"{pad}}}")
        else:
            lines.append(f"{pad}{name}: {value}")
    return "\n".join(lines) + ("\n" if lines else "")


def quote_text_proto(value):
    """A Python string as a text-format string literal (C escapes, double quotes)."""
    escaped = value.encode("utf-8").decode("latin-1")
    escaped = escaped.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + "".join(c if 32 <= ord(c) < 127 else f"\\{ord(c):03o}" for c in escaped) + '"'


def unquote_text_proto(token):
    """A text-format string literal -> Python string (the inverse of `quote_text_proto`)."""
    if len(token) < 2 or token[0] not in "\"'" or token[-1] != token[0]:
        return token
    raw = token[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape")
    return raw.encode("latin-1").decode("utf-8", "replace")


def set_model_entry(fields, name, base_path, platform="tensorflow"):
    """Add or update the `config { name: NAME ... }` entry of a parsed ModelServerConfig (in place).

    An existing entry keeps its other fields (version policy, labels, ...); only base_path and model_platform are
    set. Raises ValueError for a config that lists models another way (custom_model_config).
    """
    if any(field == "custom_model_config" for field, _ in fields):
        raise ValueError("models.config uses custom_model_config; tfcompress only edits model_config_list")
    lists = [value for field, value in fields if field == "model_config_list"]
    if not lists:
        fields.append(("model_config_list", []))
        lists = [fields[-1][1]]
    configs = lists[0]
    for field, entry in configs:
        if field == "config" and any(f == "name" and unquote_text_proto(v) == name for f, v in entry):
            kept = [(f, v) for f, v in entry if f not in ("base_path", "model_platform")]
            after_name = next(i for i, (f, _) in enumerate(kept) if f == "name") + 1
            entry[:] = [*kept[:after_name], ("base_path", quote_text_proto(base_path)),
                        ("model_platform", quote_text_proto(platform)), *kept[after_name:]]
            return fields
    configs.append(("config", [("name", quote_text_proto(name)), ("base_path", quote_text_proto(base_path)),
                               ("model_platform", quote_text_proto(platform))]))
    return fields


def validate_with_serving_api(text):
    """Parse `text` with tensorflow-serving-api's ModelServerConfig when it is installed; returns True if it did."""
    try:
        from google.protobuf import text_format
        from tensorflow_serving.config import model_server_config_pb2
    except ImportError:
        return False
    text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    return True


def update_models_config(base_dir, name, base_path=None):
    """Add or update NAME in BASE_DIR/models.config (created when missing); returns the file's path.

    Args:
        base_dir: the TF Serving model base (saved_models/).
        name: the model name.
        base_path: the directory TF Serving reads versions from. TF Serving requires an absolute path (or URI),
            so the default is the absolute path of BASE_DIR/NAME on this machine; pass e.g. "/models/NAME" when
            the server sees the directory elsewhere (a container mount).

    Other models' entries and fields are kept as written; comments are not (the file is rewritten).
    """
    check_model_name(name)
    path = os.path.join(base_dir, MODELS_CONFIG_FILE)
    base_path = base_path or os.path.abspath(os.path.join(base_dir, name))
    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    try:
        fields = parse_text_proto(text)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    new_text = format_text_proto(set_model_entry(fields, name, base_path))
    # A written file must parse back to the same structure, and with the real proto when available.
    if parse_text_proto(new_text) != fields:
        raise RuntimeError(f"internal error: {path} would not read back as written")
    try:
        validate_with_serving_api(new_text)
    except Exception as error:  # text_format.ParseError: a field ModelServerConfig does not have
        raise ValueError(f"{path} is not a valid ModelServerConfig: {error}") from None
    os.makedirs(base_dir, exist_ok=True)
    write_atomically(path, new_text)
    return path
