"""The offline batch job: a folder, glob or manifest of images through the served model file, on Ray Data.

The same ONNX file, the same preprocessing (imaging) and the same postprocessing (modelcard.outputs) as the
service, so a row of its Parquet output is the service's answer for that file. Ray is the `batch` extra's;
this package imports it only where the pipeline runs.
"""
