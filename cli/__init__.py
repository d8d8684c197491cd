"""The entry wiring: what ``train.py``, ``train_xl.py`` and ``evaluate.py`` hand to the core (model families,
model sources, the held-out verifier) and their flag parsing and one-line errors."""
