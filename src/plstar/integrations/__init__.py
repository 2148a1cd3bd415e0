"""Trainer callbacks that run a :class:`plstar.Monitor` inside someone else's training loop.

* :mod:`plstar.integrations.lightning`: ``PLStarCallback`` for ``lightning.pytorch.Trainer``
  (``pip install "plstar[lightning]"``).
* :mod:`plstar.integrations.transformers`: ``PLStarTrainerCallback`` for the Hugging Face
  ``transformers.Trainer`` (``pip install "plstar[transformers]"``).

Both watch a fixed subsample (x, y) every N trainer steps and log the square-loss PL* quantities
(L = ½‖F − y‖² summed over that subsample, ρ, distance from w₀, the envelope, and every
``every`` steps λ_min/λ_max of K, its drift and the sharpness) under ``plstar/...`` names, beside
the user's own training loss, which they leave alone. Nothing here imports the frameworks: each
submodule imports its own when it is imported.
"""
