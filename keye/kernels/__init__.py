"""keye.kernels"""
