"""MacDrop for axolotl (docs/hosts.md): ``plugins: [llamafactory_macdrop.integrations.axolotl.MacDropPlugin]``
and ``macdrop_*`` keys in the axolotl YAML. :mod:`.args`: the keys (a pydantic model axolotl merges
into its schema); :mod:`.checks`: what such a configuration is refused for; :mod:`.plugin`: when
MacDrop acts. Importable only where axolotl is installed (``make axolotl-test``)."""

from .args import MacDropArgs
from .plugin import MacDropPlugin

__all__ = ["MacDropArgs", "MacDropPlugin"]
