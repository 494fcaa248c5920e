"""A sweep file's text, read safely: its size, its encoding, and YAML without aliases or deep nesting.

Apart from `spec` (which checks what the document says) so that the command line can refuse a
hostile file before anything heavy is imported: nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from rnp_fast.errors import UserError


class SweepFileError(UserError):
    """``FILE: KEY: reason``, the one line the CLI prints."""

    def __init__(self, source: str, key: str, reason: str):
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")


MAX_FILE_BYTES = 1_000_000  # a sweep file is a few lines; anything larger is a mistake (or an attack)
MAX_DEPTH = 64  # lists and mappings inside each other; a sweep file needs three or four


class NoAliasLoader(yaml.SafeLoader):
    """YAML's safe subset without aliases. An alias (``*name``) repeats an anchored node, and aliases
    of aliases multiply: nine levels nine wide are a few hundred bytes and 387 million nodes, which
    anything walking the value (a type check, an error message) would never finish. A sweep file
    writes its values out instead; every node of the document is then a byte of the file. Nesting
    is bounded too, as the scanner reads it: PyYAML's time grows with the square of the depth of
    ``[[[...`` (100,000 deep: minutes), and its composer recurses once per level. A mapping that
    gives a key twice is refused too, naming the key and both lines."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"aliases (*{event.anchor}) are not allowed: write the values out", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        """A key given twice is refused (YAML would keep the last one silently)."""
        first_line: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = key in first_line
            except TypeError:
                continue  # an unhashable key: SafeLoader's own error follows
            if seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given at line {first_line[key]})", key_node.start_mark
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)

    def fetch_flow_collection_start(self, TokenClass):
        if self.flow_level >= MAX_DEPTH:
            raise yaml.scanner.ScannerError(None, None, too_deep(), self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def add_indent(self, column):
        if len(self.indents) >= MAX_DEPTH:
            raise yaml.scanner.ScannerError(None, None, too_deep(), self.get_mark())
        return super().add_indent(column)


def too_deep() -> str:
    return f"values nested more than {MAX_DEPTH} deep (lists or mappings inside each other)"


def read_yaml_text(text: str, source: str):
    """The document in ``text`` (YAML, or JSON, which YAML reads), or a one-line SweepFileError."""
    try:
        return yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 - a SafeLoader, aliases refused
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        reason = getattr(error, "problem", None) or type(error).__name__
        raise SweepFileError(source, "", f"not valid YAML{line}: {reason}") from None
    except RecursionError:
        raise SweepFileError(source, "", too_deep()) from None


def read_yaml(path: Path):
    if not path.is_file():
        raise SweepFileError(str(path), "", "sweep file not found")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise SweepFileError(str(path), "", f"{size:,} bytes; a sweep file may hold at most {MAX_FILE_BYTES:,}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SweepFileError(str(path), "", "not a text file") from None
    document = read_yaml_text(text, str(path))
    if document is None:
        raise SweepFileError(str(path), "", "empty sweep file (expected fixed: and axes:)")
    return document
