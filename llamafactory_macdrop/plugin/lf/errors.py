"""How the seam says that LLaMA-Factory is not where it expects it: the version found and the one supported."""

from __future__ import annotations

from ...errors import MacDropError

SUPPORTED_LLAMAFACTORY = "0.9.5"


class IntegrationError(MacDropError, RuntimeError):
    """LLaMA-Factory is not laid out as this plugin expects."""


def lf_version() -> str:
    try:
        from importlib.metadata import version

        return version("llamafactory")
    except Exception:  # pragma: no cover - metadata missing
        return "unknown"


def internals_error(what: str) -> IntegrationError:
    return IntegrationError(
        f"llamafactory-macdrop cannot hook into llamafactory {lf_version()}: {what} "
        f"(supported: llamafactory=={SUPPORTED_LLAMAFACTORY})"
    )
