"""Multi-step jobs over the library: the preset suite and the demo (``suite``) and the config search
(``tune``)."""
