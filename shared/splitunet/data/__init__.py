"""Data: BraTS layouts and loading (``layout``, ``loader``, ``cohort``), the samples every party cuts the same
way (``sampling``), caching (``cache``), the vertical partition (``partition``), the phantom cohort (``phantom``,
``phantom_model``, ``mni``), an in-process dataset (``dataset``) and tiny synthetic batches (``synthetic``)."""
