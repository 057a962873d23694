"""Calibration and quantization for deployment: `dynllava calibrate` measures quality against memory and latency
over a calibration set and writes a calibration record that every loader honours; `dynllava quantize` makes int8 /
int4 exports validated against their fp32 export."""
