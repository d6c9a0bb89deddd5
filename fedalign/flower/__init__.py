"""A Flower deployment path: fedalign's client update and aggregators as Flower apps.

* :mod:`fedalign.flower.core` (no ``flwr`` needed): named arrays, :class:`~fedalign.flower.
  core.Client` (the engine's jitted client update on one silo's data) and
  :class:`~fedalign.flower.core.Server` (the engine's aggregation of what arrives).
* :mod:`fedalign.flower.apps` (``pip install -e ".[flower]"``): the Flower ``ClientApp``,
  the ``Strategy`` (:class:`~fedalign.flower.apps.FedAlignStrategy`) and the ``ServerApp``,
  run with ``flwr run`` against a SuperLink and SuperNodes (docs/scaling.md, "Flower").
"""
