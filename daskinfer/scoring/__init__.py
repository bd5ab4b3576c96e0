"""Batch scoring of dask collections with deployed models: :func:`predict`
(``daskinfer.predict``; needs ``dask[dataframe]``: ``pip install daskinfer[batch]``).

- :mod:`~daskinfer.scoring.inputs`: rows (DataFrame columns, an array) to model inputs.
- :mod:`~daskinfer.scoring.score`: one partition scored on its worker, in blocks, with
  per-row errors.
- :mod:`~daskinfer.scoring.predict`: the dask collections, parquet in and out, progress.
"""

from daskinfer.scoring.predict import predict

__all__ = ["predict"]
