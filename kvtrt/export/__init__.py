from .onnx_export import export_model

__all__ = ["export_model"]
