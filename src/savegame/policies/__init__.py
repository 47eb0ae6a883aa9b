"""When to save (:class:`SavePolicy`) and which checkpoints to keep (:class:`KeepPolicy`): the public
module ``savegame.policies``. The values live in :mod:`~savegame.policies.values`, the save policies in
:mod:`~savegame.policies.save`, the keep policies in :mod:`~savegame.policies.keep`; all are re-exported
here, the one import path users need.

Pure decision logic: no I/O, no clock, no framework imports. The Checkpointer builds a
:class:`Progress` (where training is) and a :class:`SaveContext` (what it remembers) and asks its save
policy; after each commit it describes the committed checkpoints as :class:`CheckpointInfo` values and
asks :func:`select_for_deletion` what retention may remove. Keeping the logic pure makes every rule
testable with made-up numbers and lets the Keras callback and the Checkpointer share it.

Conventions used throughout:

* ``epoch`` is the number of **completed** epochs: 1 at the end of the first epoch, the number Keras
  shows in file names (``{epoch:02d}`` gives ``01`` for the first epoch) and what the PyTorch loops in
  the wild write as ``epoch + 1``. ``epoch == 0`` means "no epoch finished yet".
* ``step`` is the global step: batches (optimizer steps) seen since the start of training.
* ``time`` is a monotonic clock in seconds, only meaningful within one process.
* Positions that go *backwards* (the run was rolled back to an older checkpoint) are treated like
  "no previous save" rather than blocking saves until training catches up again.

Direction of a monitored metric (``mode="auto"``, :func:`resolve_mode`): Keras 3 minimises ``loss``
and otherwise asks the metric object for its direction; Keras 2 and Lightning's ancestors maximised
names containing ``"acc"`` or starting with ``"fmeasure"`` and minimised everything else. savegame sees
only names, so it decides from the name, lower-cased and split into alphanumeric tokens (``val/mAP@50``
-> ``val``, ``map``, ``50``; a token's trailing digits are also tried, so ``ap50`` matches ``ap``):

0. a ``neg`` or ``negative`` token raises :class:`~savegame.errors.ConfigError` (scikit-learn maximises
   ``neg_log_loss``; a negative log-likelihood is minimised);
1. a token in :data:`MIN_METRIC_TOKENS` (``loss``, ``error``, ``mse``, ``perplexity``, ...) -> ``"min"``;
2. ``"acc"`` anywhere in the name, or a name starting with ``fmeasure`` (the Keras rule) -> ``"max"``;
3. a token in :data:`MAX_METRIC_TOKENS` (``auc``, ``precision``, ``recall``, ``f1``, ``iou``, ``map``,
   ``score``, ``bleu``, ``psnr``, ``reward``, ...) -> ``"max"``;
4. anything else raises :class:`~savegame.errors.ConfigError` when the policy is built: pass ``mode="min"``
   or ``mode="max"``. (Keras 2 minimised such names and HF's Trainer maximises them; Keras 3 raises, as
   savegame does: a wrong guess keeps the worst checkpoints and lets retention delete the best.)
"""

from __future__ import annotations

from savegame.policies.keep import KeepAll as KeepAll
from savegame.policies.keep import KeepBest as KeepBest
from savegame.policies.keep import KeepEvery as KeepEvery
from savegame.policies.keep import KeepExponential as KeepExponential
from savegame.policies.keep import KeepLast as KeepLast
from savegame.policies.keep import KeepPerInterval as KeepPerInterval
from savegame.policies.keep import KeepPolicy as KeepPolicy
from savegame.policies.keep import KeepUnion as KeepUnion
from savegame.policies.keep import KeepWithin as KeepWithin
from savegame.policies.keep import select_for_deletion as select_for_deletion
from savegame.policies.save import AnyOf as AnyOf
from savegame.policies.save import AtEnd as AtEnd
from savegame.policies.save import EveryNEpochs as EveryNEpochs
from savegame.policies.save import EveryNSteps as EveryNSteps
from savegame.policies.save import EveryTSeconds as EveryTSeconds
from savegame.policies.save import Never as Never
from savegame.policies.save import OnImprovement as OnImprovement
from savegame.policies.save import SavePolicy as SavePolicy
from savegame.policies.save import SkipFirstEpochs as SkipFirstEpochs
from savegame.policies.values import MAX_METRIC_TOKENS as MAX_METRIC_TOKENS
from savegame.policies.values import MIN_METRIC_TOKENS as MIN_METRIC_TOKENS
from savegame.policies.values import CheckpointInfo as CheckpointInfo
from savegame.policies.values import Direction as Direction
from savegame.policies.values import Mode as Mode
from savegame.policies.values import Progress as Progress
from savegame.policies.values import SaveContext as SaveContext
from savegame.policies.values import check_count as check_count
from savegame.policies.values import check_position as check_position
from savegame.policies.values import check_threshold as check_threshold
from savegame.policies.values import is_better as is_better
from savegame.policies.values import missing_monitor_message as missing_monitor_message
from savegame.policies.values import resolve_mode as resolve_mode

__all__ = [
    "MAX_METRIC_TOKENS",
    "MIN_METRIC_TOKENS",
    "AnyOf",
    "AtEnd",
    "CheckpointInfo",
    "EveryNEpochs",
    "EveryNSteps",
    "EveryTSeconds",
    "KeepAll",
    "KeepBest",
    "KeepEvery",
    "KeepExponential",
    "KeepLast",
    "KeepPerInterval",
    "KeepPolicy",
    "KeepUnion",
    "KeepWithin",
    "Never",
    "OnImprovement",
    "Progress",
    "SaveContext",
    "SavePolicy",
    "SkipFirstEpochs",
    "is_better",
    "resolve_mode",
    "select_for_deletion",
]
