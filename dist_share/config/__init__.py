"""The config schema (frozen dataclasses whose defaults are the only defaults), field checks and YAML loading."""
