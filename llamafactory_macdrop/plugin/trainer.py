"""The trainer mixin's first path, kept for code that imports it from here: MacDrop in a
transformers Trainer lives in :mod:`llamafactory_macdrop.integrations.transformers.trainer`
(LLaMA-Factory's trainers are one user of it; docs/layout.md)."""

from ..integrations.transformers.trainer import (  # noqa: F401  (re-exported)
    RESUME_KEYS,
    SETTINGS_FILE,
    MacDropDPOTrainerMixin,
    MacDropRun,
    MacDropTrainerMixin,
    NonFiniteTrainingError,
    last_checkpoint,
    logger,
    mask_seed,
    scope_rows,
    with_macdrop,
)
