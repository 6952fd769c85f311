"""What a run prints: messages every run would show and no user can act on are silenced; the rest stays.

Silenced: Lightning's advertisement for its cloud logger, its warning that modules are in eval mode
(the momentum encoders are, on purpose: ``COTSLitModule.on_train_start`` warns instead about any other
module), its warning that a mid-epoch resume's DataLoader is not resumable (the data module resumes the
position exactly), and PyTorch's deprecation notice about ``LeafSpec`` raised inside Lightning. The MiniLM
pooler's load report is handled where the tower is loaded (``cots.models.text_tower``).
"""

from __future__ import annotations

import logging
import warnings

ADVERTISEMENT = "litlogger"  # Lightning's "Tip: ... try installing [litlogger]" at every Trainer start


class _DropAdvertisement(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return ADVERTISEMENT not in record.getMessage()


_FILTER = _DropAdvertisement()


def quiet_expected_messages() -> None:
    """Install the filters (idempotent)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # The data position is resumed by the data module's state (exact mid-epoch resume is tested), not by the
    # DataLoader object that this warning looks at.
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
