"""Evaluation of a trained LLark model, one module per task (as ``mir_eval``):

- :mod:`~llark.evaluate.key` (MIREX weighted score), :mod:`~llark.evaluate.tempo` (Acc1, Acc2),
  :mod:`~llark.evaluate.genre` (Acc@1 by nearest label embedding, and strict label match),
  :mod:`~llark.evaluate.instruments` (precision, recall, F1), :mod:`~llark.evaluate.captions`
  (BLEU, METEOR, ROUGE-L, CIDEr), :mod:`~llark.evaluate.beats` (F-measure at 20 ms),
  :mod:`~llark.evaluate.metre` (beats per bar): each with a module docstring giving its
  conventions and citations, a ``validate()``, pure metric functions and ``evaluate()``, then
  its evaluation task (question, references, parser, scorer) registered in
  :mod:`~llark.evaluate.tasks`, the registry and its one interface;
- :mod:`~llark.evaluate.parse`: reading values out of free-text answers (kept apart from scoring);
- :mod:`~llark.evaluate.stats`: Clopper-Pearson and bootstrap intervals;
- :mod:`~llark.evaluate.run`: a model over an evaluation set (with the shuffled-audio control);
- :mod:`~llark.evaluate.report`: the summary table and confusion matrices.
"""
