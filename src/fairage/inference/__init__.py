"""A trained model applied to photos: loading and batching (``predictor``), face detectors (``detect``) and
export to ONNX / TorchScript (``export``)."""
