"""Custom ONNX ops kiln emits, each with a numpy reference and an ONNX-function form that any runtime runs."""
