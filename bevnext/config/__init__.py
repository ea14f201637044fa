"""Typed dataclass configs with ``key=value`` overrides (the stage configs arrive with the model)."""

from bevnext.config.overrides import apply_overrides, config_to_dict

__all__ = ["apply_overrides", "config_to_dict"]
