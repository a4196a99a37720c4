"""flare_infer: abdominal CT organ segmentation inference (numpy, SimpleITK, onnxruntime; no torch)."""

__version__ = "0.1.0"
