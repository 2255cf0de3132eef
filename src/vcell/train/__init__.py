"""Training with Lightning: the run options, the one ``Trainer`` factory and the ST and SE recipes.

:func:`train_st` and :func:`train_se` write a run folder (``last/``, ``best/``, ``logs/``) of
pickle-free checkpoints that :meth:`vcell.nn.StateTransition.from_checkpoint` and
:meth:`vcell.nn.StateEmbedding.from_checkpoint` load.
"""

from vcell._lazy import lazy_exports

_EXPORTS = {
    ".options": ["SETrainOptions", "STTrainOptions", "TrainOptions", "check_run_options"],
    ".trainer": ["make_trainer"],
    ".display": ["show_progress"],
    ".progress": ["last_run"],
    ".se": ["train_se"],
    ".st": ["train_st"],
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
