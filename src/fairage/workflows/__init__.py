"""Multi-step jobs over the library: a model's predictions on a split and their scores (``evaluate``),
the preset suite and the demo (``suite``), the config of a training run (``train``) and the config
search (``tune``)."""
