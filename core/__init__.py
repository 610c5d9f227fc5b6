"""fedmedvit's model library: everything except the Flower apps.

Layers (arrows point the only way imports may go; ``tests/test_architecture.py`` keeps them):

    model  <-  adapters  <-  training  <-  pretrain
      ^                          ^
    data  ------------------------
    privacy, he                  (no model code)
    federation  ->  all of the above   (plain Python, no flwr)

``config`` turns Flower's flat run config into validated settings, from the torch-free
settings modules of each area (``model.sizes``, ``adapters.settings``, ``training.settings``,
``privacy.plan``), so that checking a run config costs no torch, peft or opacus import; ``io``
is the one atomic file writer. Importing ``core`` itself loads no torch, flwr or tenseal.
"""
