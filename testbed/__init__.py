"""The testbed: tiny and shapes-world model builders, pre-training, the shapes-world verifier hand-in, the model
card and the study runner. It uses the core (``srrl``) and the shapes world; the core never imports it."""
