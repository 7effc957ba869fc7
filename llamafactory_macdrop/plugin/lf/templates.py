"""LLaMA-Factory's chat templates by name (``macdrop locate --template NAME``)."""

from __future__ import annotations


def lf_template(name: str):
    """LLaMA-Factory's chat template ``name``, for
    :func:`~llamafactory_macdrop.core.first_token.template_first_token`."""
    from ...core.locator import LocatorError

    try:
        from llamafactory.data.template import TEMPLATES
    except ImportError as err:
        raise LocatorError(
            f"--template {name}: LLaMA-Factory's templates need llamafactory installed ({err})"
        ) from None
    if name not in TEMPLATES:
        raise LocatorError(f"--template {name}: not a LLaMA-Factory template; allowed: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]
