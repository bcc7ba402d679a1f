"""The ops of abft-kernels, one folder each: label_attention (attention output + label-class masses)."""
