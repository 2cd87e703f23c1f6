"""keye.train"""
