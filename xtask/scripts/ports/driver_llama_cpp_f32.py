"""Port driver: llama.cpp in its `f32` mode (F32 K/V cache, flash attention off, exact GELU from
a second build with `GGML_GELU_FP16` removed): `driver_llama_cpp.py --mode f32`, under its own
port id. See `driver_llama_cpp.py` for what is recorded, and why each setting differs from
llama.cpp's defaults.
"""

from driver_llama_cpp import main

if __name__ == "__main__":
    main(default_mode="f32")
