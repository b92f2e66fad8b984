"""chatuie: turn a chat LLM into a grounded information extractor (ChatUIE)."""

from chatuie import env as _env

_env.apply_defaults()

__version__ = "0.1.0"
