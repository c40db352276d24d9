"""The age network: backbones (``backbones``, ``vggface2``), heads (``heads``), the assembled ``AgeRegressor``
with its weights loading (``regressor``) and the losses the heads and the mitigation methods train with
(``losses``)."""
