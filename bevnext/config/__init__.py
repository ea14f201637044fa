"""Typed dataclass configs (stage 1, stage 2, tiny) with key=value overrides — filled by the model issue."""
