"""The argument of a config file's `get_config(arg)`: typed `key=value` pairs and preset names.

    --config=configs/finetune_fashion_mnist.py:recipe=semi,fraction=0.01,size=tiny
    --config=configs/finetune_fashion_mnist.py:1pct             (a preset name)
    --config=configs/finetune_fashion_mnist.py:1pct,size=tiny   (a preset, then a change)

A config file declares its keys with their defaults (the default's type is the key's type) and its
preset names, each an alias for a `key=value,...` string. The argument is read left to right, so a
later item overrides an earlier one. An unknown key or preset, or a value that does not fit its
key's type or choices, is a ValueError of one line naming it. Fields beyond these keys are changed
on the command line as always (`--config.batch_size=64`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ml_collections import config_dict

_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


class Arguments:
    """The keys (with defaults and allowed values) and preset names of one config file."""

    def __init__(
        self,
        config: str,
        defaults: Mapping[str, Any],
        *,
        choices: Mapping[str, Sequence[Any]] | None = None,
        presets: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.defaults = dict(defaults)
        self.choices = {key: tuple(values) for key, values in (choices or {}).items()}
        self.presets = dict(presets or {})
        for key in self.choices:
            if key not in self.defaults:
                raise ValueError(f"{config}: choices for {key!r}, which has no default")
        for name, expansion in self.presets.items():  # a bad preset fails at import, not in use
            if "=" in name or "," in name:
                raise ValueError(f"{config}: preset name {name!r} may not contain '=' or ','")
            if not all("=" in item for item in expansion.split(",")):
                raise ValueError(
                    f"{config}: preset {name!r} must be key=value items: {expansion!r}"
                )
            self.parse(expansion)

    def parse(self, arg: str | None) -> config_dict.FrozenConfigDict:
        """The value of every key: its default, then each item of `arg` in order."""
        values = dict(self.defaults)
        for item in (arg or "").split(","):
            item = item.strip()
            if item in self.presets:
                items = self.presets[item].split(",")
            elif "=" in item or not item:
                items = [item]
            else:
                raise ValueError(
                    f"{self.config}: {item!r} in {arg!r} is neither a preset nor key=value; "
                    f"{self.usage()}"
                )
            for pair in filter(None, items):
                key, _, text = pair.partition("=")
                values[key.strip()] = self._value(key.strip(), text.strip(), arg)
        return config_dict.FrozenConfigDict(values)

    def usage(self) -> str:
        """'keys: ...; presets: ...' for error messages."""
        keys = ", ".join(f"{key}={self._allowed(key)}" for key in self.defaults)
        return f"keys: {keys}; presets: {', '.join(self.presets) or 'none'}"

    def _allowed(self, key: str) -> str:
        if key in self.choices:
            return "|".join(str(value) for value in self.choices[key])
        return f"<{type(self.defaults[key]).__name__}>"

    def _value(self, key: str, text: str, arg: str | None) -> Any:
        """`text` as the type of `key`'s default, checked against its choices."""
        if key not in self.defaults:
            raise ValueError(f"{self.config}: unknown key {key!r} in {arg!r}; {self.usage()}")
        kind = type(self.defaults[key])
        try:
            if kind is bool:
                if text.lower() not in _TRUE + _FALSE:
                    raise ValueError
                value = text.lower() in _TRUE
            else:
                value = kind(text)
        except ValueError:
            raise ValueError(
                f"{self.config}: {key}={text!r} in {arg!r} is not of type {kind.__name__} "
                f"({key}={self._allowed(key)})"
            ) from None
        if key in self.choices and value not in self.choices[key]:
            raise ValueError(
                f"{self.config}: {key}={text!r} in {arg!r} is not one of {self._allowed(key)}"
            )
        return value
