"""Port driver: llama.cpp in its `no-flash-attention` mode: `driver_llama_cpp.py --mode no-flash-attention`, under its own
port id (see `driver_llama_cpp.py` for what is recorded and what the mode changes).
"""

from driver_llama_cpp import main

if __name__ == "__main__":
    main(default_mode="no-flash-attention")
