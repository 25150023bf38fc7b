"""The one YAML reader for every file the project reads (configs, recipes, run records).

A SafeLoader that
- refuses a mapping key given twice, naming the key and both lines (PyYAML keeps the last silently, so a
  second `train:` section would replace the first without a word);
- reads `1e-8` as a float (PyYAML follows YAML 1.1, which needs `1.0e-8`).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml


class DuplicateKeyError(yaml.YAMLError):
    """A mapping key given twice in one YAML document."""


class Loader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: PyYAML's own error follows
                    continue
                if first != key_node.start_mark.line + 1:
                    where = f" in {key_node.start_mark.name}" if key_node.start_mark.name not in ("<unicode string>",
                                                                                                 "<file>") else ""
                    raise DuplicateKeyError(
                        f"duplicate key {key!r}{where}: lines {first} and {key_node.start_mark.line + 1} "
                        "(YAML would keep only the second silently); merge them into one"
                    )
        return super().construct_mapping(node, deep=deep)


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text):
    """Parse YAML text (or an open file) with the project's loader."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def load_file(path: str | Path):
    """Parse a YAML file; a duplicate key's message names the file."""
    path = Path(path)
    try:
        return yaml_load(path.read_text())
    except DuplicateKeyError as err:
        raise DuplicateKeyError(f"{path}: {err}") from None


def load_block(path: str | Path, key: str) -> tuple[dict, str]:
    """A study's config: the file itself, or an experiment config's `key:` block. Returns (block, where), where
    naming the file (and block) for messages."""
    cfg = load_file(path) or {}
    if "experiment" not in cfg:
        return cfg, str(path)
    if not cfg.get(key):
        raise KeyError(f"{path}: an experiment config without a {key} block; nothing to run")
    return cfg[key], f"{path}: {key}"
