"""The model catalogue (pure): which models exist, their ``max_tokens`` maximum, their aliases.

The upstream says each model has its own ``max_tokens`` maximum. :data:`DEFAULT_MODELS` holds
the seed's seven models (sources in ``docs/models.md``); ``LLM_WORKER_MODELS`` replaces it
whole. A request is checked against it by :func:`worker.request.validate_request`:

- a model name is 1-128 characters of letters, digits, ``. _ : / @ -`` (always, also when
  ``ALLOWED_MODELS`` is empty and any model may be named);
- an alias is validated as its model and rewritten to the model's name before the job is
  enqueued, so the upstream, the rate limits, the metrics and the job's record see one name;
- ``max_tokens`` is at most the model's maximum, or :data:`MAX_TOKENS_CAP` for a model the
  catalogue does not know.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Final

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr, model_validator

#: The models the seed's provider lists today; the provider changes them, hence a setting.
SEED_MODELS: Final[tuple[str, ...]] = (
    "deepseek-ai/DeepSeek-V3.1",
    "Pro/moonshotai/Kimi-K2-Instruct",
    "moonshotai/Kimi-K2-Instruct",
    "Pro/deepseek-ai/DeepSeek-V3",
    "deepseek-ai/DeepSeek-V3",
    "moonshotai/Kimi-Dev-72B",
    "baidu/ERNIE-4.5-300B-A47B",
)
#: The seed's example ``max_tokens``. No per-model maximum of this provider could be found in
#: public documentation (the seed's "see models" page is not public), so every default is it.
SEED_EXAMPLE_MAX_TOKENS: Final = 8192
#: The largest ``max_tokens`` any request may ask for, whatever its model.
MAX_TOKENS_CAP: Final = 1_000_000
#: The largest context window an entry may declare.
MAX_CONTEXT_WINDOW: Final = 100_000_000
MODEL_NAME_MAX_CHARS: Final = 128
MODEL_NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9._:/@-]{1,128}\Z")
MODEL_NAME_RULE: Final = "1-128 characters of letters, digits, '.', '_', ':', '/', '@' or '-'"
#: How many allowed models an error message lists before it stops.
_LISTED_MODELS: Final = 20


def check_model_name(value: str) -> str:
    """``value`` if it is a well-formed model name, else :class:`ValueError` saying the rule."""
    if not MODEL_NAME_PATTERN.match(value):
        raise ValueError(f"a model name must be {MODEL_NAME_RULE}")
    return value


ModelName = Annotated[StrictStr, AfterValidator(check_model_name)]


class ModelSpec(BaseModel):
    """One model of the catalogue (a value of ``LLM_WORKER_MODELS``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(strict=True, ge=1, le=MAX_TOKENS_CAP)
    #: Informational: the worker does not count input tokens, so it is not enforced on
    #: requests; an entry whose max_tokens exceeds it is refused.
    context_window: int | None = Field(default=None, strict=True, ge=1, le=MAX_CONTEXT_WINDOW)
    aliases: tuple[ModelName, ...] = ()

    @model_validator(mode="after")
    def _fits_its_window(self) -> ModelSpec:
        if self.context_window is not None and self.max_tokens > self.context_window:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) exceeds context_window ({self.context_window})"
            )
        return self


DEFAULT_MODELS: Final[Mapping[str, ModelSpec]] = {
    name: ModelSpec(max_tokens=SEED_EXAMPLE_MAX_TOKENS) for name in SEED_MODELS
}


def alias_map(specs: Mapping[str, ModelSpec]) -> dict[str, str]:
    """Every alias and the model it names; :class:`ValueError` when one is ambiguous."""
    aliases: dict[str, str] = {}
    for name, spec in specs.items():
        for alias in spec.aliases:
            if alias in specs:
                raise ValueError(f"alias {alias!r} of {name!r} is itself a model's name")
            if alias in aliases and aliases[alias] != name:
                raise ValueError(f"alias {alias!r} names both {aliases[alias]!r} and {name!r}")
            aliases[alias] = name
    return aliases


@dataclass(frozen=True)
class ModelCatalogue:
    """The catalogue with the allow list applied; what validation and metrics consult."""

    specs: Mapping[str, ModelSpec] = field(default_factory=dict)
    #: Canonical names a request may name (or an alias of); empty means any model.
    allowed: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def build(
        cls, specs: Mapping[str, ModelSpec], allowed: Iterable[str] | None = None
    ) -> ModelCatalogue:
        """``allowed`` None means the catalogue's models; an alias in it means its model."""
        aliases = alias_map(specs)
        names = list(specs) if allowed is None else [aliases.get(n, n) for n in allowed]
        return cls(dict(specs), tuple(dict.fromkeys(names)), aliases)

    def canonical(self, name: str) -> str:
        """The model an alias stands for; any other name is returned as it is."""
        return self.aliases.get(name, name)

    def allows(self, name: str) -> bool:
        return not self.allowed or self.canonical(name) in self.allowed

    def max_tokens(self, name: str) -> int:
        """The model's ``max_tokens`` maximum, or the global cap for a model not listed."""
        spec = self.specs.get(self.canonical(name))
        return spec.max_tokens if spec is not None else MAX_TOKENS_CAP

    def allowed_text(self) -> str:
        """The allowed models, for an error message (the first few when there are many)."""
        shown = ", ".join(self.allowed[:_LISTED_MODELS])
        more = len(self.allowed) - _LISTED_MODELS
        return shown + (f" and {more} more" if more > 0 else "")

    def label_names(self) -> frozenset[str]:
        """The model names a metric may carry as its ``model`` label (others fold to
        ``other``): every catalogued model and every allowed one."""
        return frozenset(self.specs) | frozenset(self.allowed)
