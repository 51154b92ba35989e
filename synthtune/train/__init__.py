"""Fine-tuning on accelerate: `fine_tune/train.py` and `synthtune train` are thin wrappers over `train`."""
