"""The artefacts on disk, one owner each: the run folder (``run_folder``), the predictions file
(``predictions``) and the challenge submission (``submission``)."""
