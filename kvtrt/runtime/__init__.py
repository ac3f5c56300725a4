"""Running an export: engines (ONNX Runtime, TensorRT), the generation loop, the KV manager.

`kvtrt.load` (in `llm.py`) is the entry point; nothing here imports the exporter.
"""
