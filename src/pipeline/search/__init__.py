"""Hyperparameter search as jobs of the workflow.

- :mod:`.space`: the training options a config lets vary, and their ranges;
- :mod:`.trial`: one trial, proposed by Optuna from the earlier trials, trained and scored on
  held-out simulations;
- :mod:`.records`: a finished trial as the others read it;
- :mod:`.select`: the choice among the trials, guarding calibration.

Import from the modules: the selection and the report need neither torch nor Optuna.
"""
