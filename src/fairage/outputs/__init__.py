"""What people read: the comparison report (``report``, ``plots``, ``templates/``), the model card
(``modelcard``) and the published reference table (``reference``)."""
