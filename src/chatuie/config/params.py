"""params.yaml as the stages see it: the full default, with the active profile's overlay merged in.

params.yaml holds every default and names the active profile (``profile: smoke``); the profile's
overlay, ``profiles/<name>.yaml`` next to it, holds only what differs, and every reader of params
goes through :func:`load_params`, which merges the two:

* a mapping merges key by key (recursively); any other value (a list, a scalar, null) replaces the
  default whole, so a list is never merged item by item;
* ``~key:`` (no value) removes ``key``: the stage's built-in default applies, as when params.yaml
  leaves a key out;
* ``+key: value`` adds a key params.yaml leaves out (a key the stage reads, with its built-in
  default in params.yaml's runs);
* any other key must be one of params.yaml's, or the overlay is refused, the file and key named:
  ``profiles/smoke.yaml: sft.train.max_stepz: not a key of params.yaml``.

The profile is chosen in params.yaml only (``make profile P=smoke``, or ``dvc exp run -S
profile=smoke``), never by an environment variable: DVC reads it there too (dvc.yaml's
``profiles/${profile}.yaml`` params, section by section), so a switch reruns what it changes.
A params file with no ``profile`` key is read as it is (a test's, an archived run's).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from chatuie.errors import ChatuieError

PROFILE_KEY = "profile"  # params.yaml's top-level key naming the active profile
PROFILES_DIR = "profiles"  # next to params.yaml: profiles/<name>.yaml
REMOVE, ADD = "~", "+"  # overlay key prefixes: ~key removes params.yaml's key, +key adds one it lacks
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class ConfigError(ChatuieError, ValueError):
    """A params or configuration mistake; the message names the file and key."""


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus YAML 1.2's exponent floats.

    DVC writes `dvc exp run -S key=5e-5` as YAML 1.2 (`5e-05`, no dot), which YAML 1.1 reads as
    text; here it is the float DVC meant, for every key.
    """


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """One params file as written (no overlay merged): a mapping, ``{}`` for an empty file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.load(handle, Loader=_ParamsLoader) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of stage sections")
    return data


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """params.yaml with its active profile's overlay merged in (the module's docstring)."""
    path = Path(path)
    params = read_yaml(path)
    overlay = overlay_path(path, params)
    if overlay is None:
        return params
    return merge(params, read_yaml(overlay), str(overlay), path.name)


def known_profiles(params_path: str | Path = "params.yaml") -> list[str]:
    """The profiles next to ``params_path``: the names of ``profiles/*.yaml``."""
    folder = Path(params_path).parent / PROFILES_DIR
    return sorted(p.stem for p in folder.glob("*.yaml") if _NAME.match(p.stem))


def overlay_path(path: str | Path, params: Mapping[str, Any] | None = None) -> Path | None:
    """The overlay of the profile ``path`` names (``profiles/<name>.yaml`` beside it), None when it
    names none. An unknown profile is a ConfigError listing the known ones."""
    path = Path(path)
    params = read_yaml(path) if params is None else params
    if PROFILE_KEY not in params:
        return None
    name = params[PROFILE_KEY]
    overlay = path.parent / PROFILES_DIR / f"{name}.yaml"
    if not isinstance(name, str) or not _NAME.match(name) or not overlay.is_file():
        known = ", ".join(known_profiles(path)) or f"none: no {path.parent / PROFILES_DIR}/*.yaml"
        raise ConfigError(f"{path}: {PROFILE_KEY}: no profile {name!r} (known: {known})")
    return overlay


def merge(
    base: Mapping[str, Any], overlay: Mapping[str, Any], where: str, base_name: str = "params.yaml"
) -> dict[str, Any]:
    """``base`` with ``overlay`` merged in (a new dict; neither is changed). ``where`` names the
    overlay in errors, ``base_name`` the file ``base`` came from."""
    if PROFILE_KEY in overlay or f"{ADD}{PROFILE_KEY}" in overlay or f"{REMOVE}{PROFILE_KEY}" in overlay:
        raise ConfigError(f"{where}: {PROFILE_KEY}: the profile is chosen in {base_name}, not in a profile")
    merged = copy.deepcopy(dict(base))
    _merge_into(merged, overlay, where, base_name, "")
    return merged


def _merge_into(node: dict, overlay: Mapping[str, Any], where: str, base_name: str, prefix: str) -> None:
    if not isinstance(overlay, Mapping):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or '(top)'}: expected a mapping, got {overlay!r}")
    plain = {_plain(k) for k in overlay}
    if len(plain) < len(overlay):
        twice = next(k for k in overlay if sum(_plain(o) == _plain(k) for o in overlay) > 1)
        raise ConfigError(f"{where}: {prefix}{_plain(twice)}: set, added or removed more than once")
    for key, value in overlay.items():
        name = _plain(key)
        dotted, at = f"{prefix}{name}", f"{where}: {prefix}{key}"
        if isinstance(key, str) and key.startswith(REMOVE):
            if value is not None:
                raise ConfigError(f"{at}: removes {dotted}, so it takes no value (`{key}:`)")
            if name not in node:
                raise ConfigError(f"{at}: {dotted} is not a key of {base_name}: nothing to remove")
            del node[name]
        elif isinstance(key, str) and key.startswith(ADD):
            if name in node:
                raise ConfigError(f"{at}: {dotted} is a key of {base_name} already: write {name} (no {ADD})")
            node[name] = copy.deepcopy(value)
        elif key not in node:
            hint = f"to add one it leaves out: {ADD}{key}"
            raise ConfigError(f"{where}: {dotted}: not a key of {base_name} ({hint})")
        elif isinstance(node[key], dict) and isinstance(value, Mapping):
            _merge_into(node[key], value, where, base_name, f"{dotted}.")
        else:
            node[key] = copy.deepcopy(value)


def _plain(key: Any) -> Any:
    """An overlay key without its ``~``/``+``."""
    if isinstance(key, str) and key[:1] in (REMOVE, ADD) and len(key) > 1:
        return key[1:]
    return key


def overlay_keys(overlay: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys an overlay sets, adds or removes (its leaves: a mapping it merges is not one)."""
    keys = []
    for key, value in overlay.items():
        dotted = f"{prefix}{_plain(key)}"
        if isinstance(key, str) and key[:1] in (REMOVE, ADD) and len(key) > 1:
            keys.append(dotted)
        elif isinstance(value, Mapping):  # merged key by key ({}: sets nothing)
            keys += overlay_keys(value, f"{dotted}.")
        else:
            keys.append(dotted)
    return keys


def source_of(params_path: str | Path, dotted: str) -> str:
    """The file whose value ``dotted`` (``sft.train.max_steps``; list indices ignored) has in the
    merged params: the active overlay when it sets, adds or removes that key or one above it, else
    ``params_path``. For error messages."""
    params_path = Path(params_path)
    try:
        overlay = overlay_path(params_path)
        if overlay is None:
            return str(params_path)
        keys = overlay_keys(read_yaml(overlay))
    except (ConfigError, OSError):
        return str(params_path)
    dotted = re.sub(r"\[\d+\]", "", dotted)
    if any(dotted == key or dotted.startswith(f"{key}.") for key in keys):
        return str(overlay)
    return str(params_path)


def blame(message: str, params_path: str | Path, label: str | None = None) -> str:
    """A ConfigError message ``<label>: <key>: ...`` (``label``: ``params_path`` by default) with the
    file that set ``<key>`` in front instead (:func:`source_of`): the overlay when the profile set it."""
    prefix = f"{label or params_path}: "
    if not message.startswith(prefix):
        return message
    rest = message[len(prefix) :]
    source = source_of(params_path, rest.split(": ", 1)[0].split(" ", 1)[0])
    return message if source == str(params_path) else f"{source}: {rest}"
